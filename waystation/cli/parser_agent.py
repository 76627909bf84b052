"""Parser group of the device agent: `waystation agent ...`."""

from __future__ import annotations

from pathlib import Path

from waystation.cli.argtypes import assignment, number, positive_int
from waystation.cli.builder import Builder, json_flag, record_args


def add_agent(b: Builder) -> None:
    b.group("agent", "the device agent: run it, read and write records, see its state",
            "Commands of the device agent: `run` is the daemon that keeps the local store "
            "in sync with the server; the other commands read and write the local store "
            "directly (a write is saved locally and synced when the link is up) and show "
            "the agent's status, dead letters and conflicts.")
    b.leaf("agent run", "run the agent daemon (foreground, systemd-friendly)",
           "Run the device agent in the foreground: open the local store, connect to the "
           "broker and keep syncing until stopped (SIGTERM or Ctrl-C). Writes made by "
           "other `waystation agent` commands or by apps on this device are noticed and "
           "sent; the daemon survives losing the link, restarts and power loss.",
           config="agent")
    p = b.leaf("agent status", "show sync state: online, pending, last sync, problems",
               "Show the agent's sync state as people need it: whether it is online, how "
               "many local changes are waiting and how old the oldest one is, when it last "
               "synced, and how many dead letters and open conflicts there are. Works "
               "whether or not the daemon is running.", config="agent")
    json_flag(p)
    p = b.leaf("agent sync", "sync now: lift the sync windows, metered and battery policy",
               "Tell the running sync daemon to send what its sync policy holds back "
               "(windows, metered link, day's budget, battery) now, for policy.sync_now_s. "
               "A server group announced down still holds everything.", config="agent")
    json_flag(p)
    p = b.leaf("agent put", "write fields of a record (saved locally, synced later)",
               "Set fields of a record in the local store. Each FIELD=VALUE takes VALUE as "
               "JSON when it parses as JSON (42, true, null, \"text\", [1,2], {\"a\":1}) and "
               "as plain text otherwise. The write is durable when the command returns and "
               "is synced to the server when the link is up.", config="agent")
    record_args(p)
    p.add_argument("fields", metavar="FIELD=VALUE", nargs="+", type=assignment,
                   help="a field and its new value (parsed into a (field, value) pair)")
    json_flag(p)
    p = b.leaf("agent get", "show one record as this device sees it",
               "Show one record from the local store: the authoritative value from the "
               "server with this device's pending changes applied, and which fields are "
               "still waiting to sync.", config="agent")
    record_args(p)
    json_flag(p)
    p = b.leaf("agent list", "list the records of a collection",
               "List the records of one collection in the local store, with pending "
               "changes applied and deleted records left out.", config="agent")
    p.add_argument("collection", metavar="COLLECTION",
                   help="collection name, as in the collection schema")
    json_flag(p)
    p = b.leaf("agent fetch", "bring records back from the server by key or by query",
               "Ask the server for records by key, or (--where) for the records matching a "
               "filter: records retention evicted from this device, or records of its "
               "scopes it never held. The request is kept until the sync daemon is "
               "connected to a server that answers it; --wait says how long this command "
               "waits for the answer. A query's answer is bounded (--limit, and the "
               "server's scan budget): when it stops early it prints the --after KEY to "
               "go on with.", config="agent")
    p.add_argument("collection", metavar="COLLECTION",
                   help="collection name, as in the collection schema")
    p.add_argument("keys", metavar="KEY", nargs="*",
                   help="record keys (at most 100); none with --where")
    p.add_argument("--where", metavar="JSON", default=None,
                   help="fetch by query: a filter as JSON, the local query's `where` "
                        "(docs/QUERIES.md), e.g. '{\"status\": \"delivered\", "
                        "\"eta\": {\"gte\": 1764000000000}}'; '{}' for every record")
    p.add_argument("--limit", metavar="N", type=int, default=None,
                   help="with --where: records at most (1 to 1000, default 100)")
    p.add_argument("--after", metavar="KEY", default=None,
                   help="with --where: go on after this key (the `next` of an answer)")
    p.add_argument("--wait", metavar="SECONDS", type=number, default=0.0,
                   help="wait up to this long for the server's answer (default 0, max 300)")
    json_flag(p)
    p = b.leaf("agent delete", "delete a record (saved locally, synced later)",
               "Delete a record in the local store. The deletion syncs like any other "
               "write; a concurrent edit elsewhere is kept in the conflict log.",
               config="agent")
    record_args(p)
    json_flag(p)
    p = b.leaf("agent incr", "add to a counter field",
               "Add AMOUNT (negative to subtract) to a counter field of a record. "
               "Increments from every device add up exactly, however they interleave.",
               config="agent")
    record_args(p)
    p.add_argument("field", metavar="FIELD", help="a counter field")
    p.add_argument("amount", metavar="AMOUNT", type=number, help="a number, e.g. 3 or -1")
    json_flag(p)
    p = b.leaf("agent add", "add members to a set field",
               "Add one or more members to a set field of a record. Sets merge "
               "add-wins: a member added on one device and removed concurrently on "
               "another stays.", config="agent")
    record_args(p)
    p.add_argument("field", metavar="FIELD", help="a set field")
    p.add_argument("members", metavar="MEMBER", nargs="+", help="set members (strings)")
    json_flag(p)
    p = b.leaf("agent remove", "remove members from a set field",
               "Remove one or more members from a set field of a record, as this device "
               "has seen them; members added concurrently elsewhere stay.", config="agent")
    record_args(p)
    p.add_argument("field", metavar="FIELD", help="a set field")
    p.add_argument("members", metavar="MEMBER", nargs="+", help="set members (strings)")
    json_flag(p)
    p = b.leaf("agent conflicts", "list conflicts involving this device's records",
               "List the conflicts the server reported for records this device holds: "
               "concurrent writes that lost, and manual fields waiting for a person to "
               "decide.", config="agent")
    json_flag(p)
    p = b.leaf("agent watch", "print changes to local records as they happen",
               "Follow the local store and print every change to its records as it "
               "happens, from this device or from the server, optionally for one "
               "collection only. Stop with Ctrl-C.", config="agent")
    p.add_argument("collection", metavar="COLLECTION", nargs="?", default=None,
                   help="only this collection (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    b.group("agent token", "tokens of the apps that use the local API",
            "Issue, list and remove the tokens apps send to the agent's local API "
            "(Authorization: Bearer TOKEN). A token is shown once, when it is issued, and "
            "stored hashed in the store's directory; the running agent sees changes at "
            "once.")
    p = b.leaf("agent token add", "issue a token for an app",
               "Issue a token for APP with read and write rights on the named collections "
               "('*' for all; writing implies reading). The token is printed once.",
               config="agent")
    p.add_argument("app", metavar="APP", help="the app's name (letters, digits, . _ -)")
    p.add_argument("--read", metavar="COLLECTIONS", action="append", default=[],
                   help="collections it may read (comma-separated, repeatable; '*': all)")
    p.add_argument("--write", metavar="COLLECTIONS", action="append", default=[],
                   help="collections it may write (comma-separated, repeatable; '*': all)")
    json_flag(p)
    p = b.leaf("agent token list", "list the apps' tokens (without secrets)",
               "List the issued tokens: id, app and rights. Secrets are never shown again.",
               config="agent")
    json_flag(p)
    p = b.leaf("agent token remove", "remove an app's token(s)",
               "Remove a token by its id, or every token of an app by the app's name; "
               "the running agent refuses it from the next request on.", config="agent")
    p.add_argument("ident", metavar="ID_OR_APP", help="a token id or an app name")
    json_flag(p)
    _add_atrest(b)
    _add_salvage(b)


def _add_salvage(b: Builder) -> None:
    p = b.leaf("agent salvage", "queue again the pending writes of a moved-aside store",
               "Read a store moved aside (a damaged one: deploy/README.md, \"A damaged "
               "device store\") read-only, as far as its pages still read, and queue every "
               "pending change it holds (written on this device, never acknowledged) again "
               "as a new local write of the current store: same values, original stamp and "
               "base (the server merges them as the late writes they are), transactions "
               "kept together. A DRY RUN unless --apply. Running it again queues nothing "
               "twice. The agent service may run meanwhile.", config="agent")
    p.add_argument("path", metavar="PATH",
                   help="the moved-aside store directory (holding data.mdb)")
    p.add_argument("--apply", action="store_true",
                   help="queue the changes (default: only report what would be queued)")
    p.add_argument("--dry-run", action="store_true",
                   help="only report (the default; for scripts that say so)")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None,
                   help="the key file the old store was encrypted with; default: "
                        "storage.encryption_key_file of the config")
    p.add_argument("--skip-uncertain", action="store_true",
                   help="leave out counter increments and set adds that may count twice "
                        "(their original may have reached the server before the damage)")
    json_flag(p)


def _add_atrest(b: Builder) -> None:
    key_help = ("the key file the store is (to be) encrypted with; default: "
                "storage.encryption_key_file of the config (${CREDENTIALS_DIRECTORY} is "
                "expanded from the environment)")
    batch_help = "values rewritten per transaction (default 1000)"
    p = b.leaf("agent encrypt", "encrypt an existing local store in place (resumable)",
               "Turn encryption at rest on for the local store: a new random data key, "
               "wrapped with the key file, seals every stored value (records, pending "
               "changes, conflicts, dead letters). A store encrypted before data keys "
               "existed is moved to one. The agent service must be stopped and no app may "
               "have the store open. Safe to interrupt (even kill -9 or power loss): run it "
               "again to finish; until then the store refuses to open. Then set "
               "storage.encryption_key_file and start the service.", config="agent")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    p.add_argument("--batch", metavar="N", type=positive_int, default=1000, help=batch_help)
    json_flag(p)
    p = b.leaf("agent decrypt", "store the local store's values in plain text again",
               "Turn encryption at rest off (the way back from `agent encrypt`): every "
               "value is rewritten in plain text and the data key is destroyed. Same "
               "conditions and crash safety as `agent encrypt`. Then remove "
               "storage.encryption_key_file from the config and start the service.",
               config="agent")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    p.add_argument("--batch", metavar="N", type=positive_int, default=1000, help=batch_help)
    json_flag(p)
    p = b.leaf("agent rekey", "wrap the store's data key with a new key file (O(1))",
               "Change the key the local store is encrypted with: the store's data key is "
               "re-wrapped with the new key file (a 48-byte file is rewritten, not the "
               "store). Crash-safe: the data key file is always wrapped with the old or the "
               "new key. The agent service must be stopped; afterwards point "
               "storage.encryption_key_file (or the systemd credential) at the new key.",
               config="agent")
    p.add_argument("--new-key-file", metavar="PATH", type=Path, required=True,
                   help="the new key file (at least 16 bytes; use 32 random bytes)")
    p.add_argument("--key-file", metavar="PATH", type=Path, default=None, help=key_help)
    json_flag(p)
