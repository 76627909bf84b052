"""Operator commands of the server side (`waystation server ...`, `device ...`, `broker ...`).

One module per topic; the command table (`waystation.cli.commands.HANDLERS`) names each
handler as ``"broker.cli.<module>:cmd_x"``:

    daemons.py      server run (and broker run)
    status.py       server status, server devices
    conflicts.py    server conflicts, server resolve
    deadletters.py  server deadletters
    backup.py       server backup, server restore
    enrol.py        device add (registration, login, agent config)
    devices.py      device list/remove/wipe/resync/disable/enable
    logins.py       broker passwd, and password-file entries for devices
    common.py       the server config of a command, the clock

Each handler is `cmd_x(args, env) -> int` (see `waystation.cli`). They work on the store
directly, so they run next to a live server (LMDB allows several processes; the server
notices registry changes and queued resolutions at its next tick). Output is a table
for people, or one JSON document with `--json`. Errors are `WaystationError`s, which
the entry point prints as one line with a non-zero exit code.
"""
