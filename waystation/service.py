"""Running a part as a long-lived service: signals, systemd readiness and watchdog.

`run_service` is the one foreground loop of `agent run` and `server run`: start the
part, tell systemd it is ready (Type=notify), feed the watchdog only while the part
reports itself healthy, keep the status line fresh, and on SIGTERM/SIGINT stop the part
cleanly before returning.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from waystation import systemd
from waystation.errors import ConfigError


def run_service(*, start: Callable[[], None], stop: Callable[[], None],
                healthy: Callable[[], bool], status: Callable[[], str],
                env: Mapping[str, str], on_started: Callable[[], None] | None = None,
                interval_s: float = 1.0,
                failed: Callable[[], BaseException | None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code: 0 after SIGTERM (the
    normal stop, e.g. `systemctl stop`), 130 after SIGINT (Ctrl-C), as `--help` says.
    `failed` is asked every interval: an error it returns stops the service and is
    raised (after `stop`), so the command exits with its code."""
    failure: list[BaseException] = []
    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)
        stopping.set()

    old_term = signal.signal(signal.SIGTERM, on_signal)
    old_int = signal.signal(signal.SIGINT, on_signal)
    watchdog = systemd.Watchdog(healthy, env=env)
    try:
        start()
        if on_started is not None:
            on_started()
        systemd.ready(env=env)
        watchdog.start()
        while not stopping.wait(interval_s):
            error = failed() if failed is not None else None
            if error is not None:
                failure.append(error)
                break
            systemd.status(status(), env=env)
    finally:
        systemd.stopping(env=env)
        watchdog.stop()
        with contextlib.suppress(Exception):
            stop()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
    if failure:
        raise failure[0]
    return 130 if received and received[0] == signal.SIGINT else 0


def check_state_directory(data_dir: Path, env: Mapping[str, str], part: str) -> None:
    """Under a systemd unit with StateDirectory= (systemd sets $STATE_DIRECTORY), the
    config's data_dir must be that directory: the service and the commands an operator
    runs by hand with the same --config must use one store (a write made by hand into
    another store would never sync). ConfigError otherwise."""
    states = [Path(p) for p in env.get("STATE_DIRECTORY", "").split(":") if p]
    if not states:
        return
    here = Path(data_dir).resolve()
    if any(here == state.resolve() for state in states):
        return
    raise ConfigError(
        f"{part} data_dir is {data_dir}, but this service's StateDirectory is "
        f"{states[0]}: set data_dir = \"{states[0]}\" in the {part} config, so that the "
        f"service and the `waystation {part} ...` commands run by hand use the same store; "
        f"or, for a unit copied to run another {part} with its own data_dir, set that unit's "
        f"StateDirectory= to it (deploy/README.md)")

