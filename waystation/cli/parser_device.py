"""Parser groups of fleet administration: `waystation device ...`, `waystation broker ...`."""

from __future__ import annotations

from pathlib import Path

from waystation.cli.argtypes import device_id, duration_s, scope_id
from waystation.cli.builder import Builder, json_flag


def add_device(b: Builder) -> None:
    b.group("device", "register devices with the server and broker",
            "Manage the fleet's devices: register one (credentials, scopes, and an agent "
            "config file to copy to it), list them, or remove one.")
    p = b.leaf("device add", "register a device and write its agent config",
               "Register device ID with the server: give it broker credentials and the "
               "scopes it may read and write, and write an agent config file for it (into "
               "--out) to copy onto the device.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id,
                   help="the new device's id (also its broker user name)")
    p.add_argument("--scope", dest="scopes", metavar="S", action="append", required=True,
                   help="a scope the device syncs (repeat for several)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="where to write the device's agent config (default: current directory)")
    p.add_argument("--systemd", action="store_true",
                   help="write the config for the systemd unit's layout on the device: "
                        "/etc/waystation/{ca.pem,fleet.toml}, state in "
                        "/var/lib/waystation/agent, and the password in a separate file "
                        "for LoadCredential= (see deploy/README.md)")
    json_flag(p)
    p = b.leaf("device list", "list registered devices",
               "List the devices registered with the server, with the scopes each may "
               "sync and whether it has broker credentials.", config="server")
    json_flag(p)
    p = b.leaf("device remove", "revoke a device",
               "Remove device ID: revoke its broker credentials and stop accepting its "
               "changes. Its past changes stay in the store.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device wipe", "order a device to erase its local data",
               "Queue a wipe command for device ID (a lost or stolen device): when it is "
               "next online it erases every local record, outbox entry and dead letter, "
               "keeping only its identity, and reports back. Unsynced writes on it are "
               "lost; that is the point. Combine with `device disable` to refuse it "
               "afterwards.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device resync", "order a device to rebuild its data from the server",
               "Queue a resync command for device ID: it drops its copy of the server's "
               "data and checkpoints, keeps its unsynced writes, and catches up from zero.",
               config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device sync", "order a device to sync now, whatever its sync policy",
               "Queue a sync command for device ID: for its policy.sync_now_s it sends what "
               "its sync windows, metered-link or battery policy hold back (not while its "
               "server group is announced down). Sent only to an agent that agreed to "
               "capability sync (this version or later); for an older one it stays "
               "pending.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device disable", "refuse a device's changes (keeps its registration)",
               "Disable device ID: it gets no data, and its changes and catch-ups are "
               "answered with device_disabled (transient: they stay on the device, which "
               "is told to wait for `waystation device enable ID`, and are not dead "
               "letters) until it is enabled again. Its broker login is kept.",
               config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device enable", "accept a disabled device's changes again",
               "Enable device ID again after `device disable`: the server accepts its "
               "changes from its next message on, and queues a sync command for an agent "
               "that agreed to capability sync, so the changes it held go at once instead "
               "of when its retry backoff runs out (an older agent waits for its "
               "backoff).", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    json_flag(p)
    p = b.leaf("device scopes", "add or remove scopes of a device (no re-enrolment)",
               "Change the scopes device ID follows: the server applies the new list at "
               "once and tells the device, which catches up added scopes and drops the "
               "records of removed ones (keeping its own unsynced writes until they are "
               "answered). Its broker login and agent config stay. Without --add/--remove: "
               "print its scopes.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    p.add_argument("--add", metavar="S", action="append", type=scope_id,
                   help="a scope to follow too (repeat for several)")
    p.add_argument("--remove", metavar="S", action="append", type=scope_id,
                   help="a scope to stop following (repeat for several)")
    json_flag(p)


    p = b.leaf("device rotate-password", "give a device a new broker password, no lockout",
               "Rotate device ID's broker password: the broker accepts the old and the new "
               "one meanwhile; an agent that speaks capability creds gets the new one over "
               "the protocol, stores it and logs in with it, and then the server retires "
               "the old one (or at --retire-after). For an older agent the new password is "
               "printed: write it into its config. Running it again supersedes a rotation "
               "still under way.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    p.add_argument("--retire-after", metavar="DURATION", type=duration_s, default=None,
                   help="retire the old password after this long even if the device has "
                        "not logged in with the new one (seconds, or 12h, 7d ...)")
    json_flag(p)

    p = b.leaf("device renew-cert", "give a device a new client certificate, no lockout",
               "Renew device ID's client certificate (fleets with enrol.client_ca_cert): an "
               "agent that speaks capability cert_renew makes a new key itself, the server "
               "signs its request and the agent connects with the new certificate; the old "
               "one stays valid until it expires. For an older agent the command waits; "
               "--out writes new files to copy to it by hand. Running it again supersedes "
               "a renewal still under way.", config="server")
    p.add_argument("device_id", metavar="ID", type=device_id, help="the device's id")
    p.add_argument("--days", metavar="N", type=int, default=None,
                   help="validity of the new certificate (default enrol.client_cert_days)")
    p.add_argument("--out", metavar="DIR", type=Path, default=None,
                   help="also issue a new certificate and key into DIR for copying by hand "
                        "(an agent without capability cert_renew)")
    json_flag(p)


def add_broker(b: Builder) -> None:
    b.group("broker", "the embedded MQTT broker",
            "The embedded amqtt broker, for a single-machine fleet or development. "
            "Production fleets may run Mosquitto or EMQX instead (see deploy/).")
    b.leaf("broker run", "run the embedded MQTT broker",
           "Run the embedded amqtt broker in the foreground with Waystation's "
           "authentication (password file) and per-device topic ACL, until stopped "
           "(SIGTERM: exit 0; Ctrl-C: exit 130). When the password file has no login for "
           "the server (server_users), it generates one and keeps the password in "
           "data_dir/server-password (mode 0600) for `waystation server run` on this "
           "machine. A busy port or tls_port is one error line (exit 4).",
           config="broker")
    p = b.leaf("broker passwd", "add or change a broker login (e.g. the server's)",
               "Add USER to the broker's password file (Mosquitto's format, read by the "
               "embedded broker and by Mosquitto alike) with a new random password, or "
               "with one read from standard input (--stdin). Prints the password once. "
               "Devices get their logins from `waystation device add`; use this for the "
               "merge server's login (user waystation-server).", config="broker")
    p.add_argument("user", metavar="USER", help="the login name, e.g. waystation-server")
    p.add_argument("--stdin", action="store_true",
                   help="read the password from standard input instead of generating one")
    p.add_argument("--password-file", type=Path, default=None,
                   help="the password file (default: the broker config's password_file)")
    json_flag(p)
