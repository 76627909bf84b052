"""The shipped Mosquitto config (deploy/mosquitto/), made runnable on a test machine.

    render_conf(text, ...)           the production config with paths, ports and user
                                     rewritten (nothing else), for a test run
    write_production_conf(workdir, ...)  a ready work directory: rendered config, the
                                     shipped ACL, an empty persistence directory; the
                                     caller writes ``workdir/passwd``
    directives(text)                 ``name -> [value, ...]`` of a Mosquitto config

Used by tests/deploy/test_mosquitto_conf.py (which checks each setting's behaviour) and
by the end-to-end fleet (tests/e2e/fleet.py), so both run exactly the production file.
"""

from __future__ import annotations

import os
import pwd
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "mosquitto" / "mosquitto.conf"
ACL = REPO / "deploy" / "mosquitto" / "acl"

__all__ = ["ACL", "CONF", "MOSQUITTO", "directives", "render_conf", "write_production_conf"]


def _find_mosquitto() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


MOSQUITTO = _find_mosquitto()
"""The mosquitto binary, or None when it is not installed."""


def render_conf(text: str, *, workdir: Path, port: int, tls_port: int,
                ca: Path, cert: Path, key: Path, user: str) -> str:
    """The production config with paths, ports and user rewritten for a test run.

    Every directive rewritten must occur exactly once in `text`; all other lines are
    copied verbatim (AssertionError otherwise, so a changed config fails loudly here).
    """
    rewrites: dict[str, str] = {
        "user": f"user {user}",
        "password_file": f"password_file {workdir / 'passwd'}",
        "acl_file": f"acl_file {workdir / 'acl'}",
        "persistence_location": f"persistence_location {workdir / 'data'}/",
        "listener 1883": f"listener {port} 127.0.0.1",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "cafile": f"cafile {ca}",
        "certfile": f"certfile {cert}",
        "keyfile": f"keyfile {key}",
    }
    seen: dict[str, int] = dict.fromkeys(rewrites, 0)
    out: list[str] = []
    for line in text.splitlines():
        for prefix, replacement in rewrites.items():
            if line == prefix or line.startswith(prefix + " "):
                seen[prefix] += 1
                line = replacement
                break
        out.append(line)
    wrong = {prefix: count for prefix, count in seen.items() if count != 1}
    assert not wrong, f"{CONF}: expected each of these once: {wrong}"
    return "\n".join(out) + "\n"


def directives(text: str) -> dict[str, list[str]]:
    """`name -> [value, ...]` of every non-comment line of a Mosquitto config."""
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


def write_production_conf(workdir: Path, *, port: int, tls_port: int, ca: Path, cert: Path,
                          key: Path) -> Path:
    """Prepare `workdir` to run Mosquitto from the shipped config; returns the config path.

    Writes ``mosquitto.conf`` (rendered, running as the current user), copies the shipped
    ``acl`` and creates the persistence directory ``data/``. Logins go into
    ``workdir/passwd`` (the caller writes them; Mosquitto rereads it on SIGHUP).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "data").mkdir(exist_ok=True)
    shutil.copyfile(ACL, workdir / "acl")
    conf = workdir / "mosquitto.conf"
    conf.write_text(render_conf(CONF.read_text(), workdir=workdir, port=port, tls_port=tls_port,
                                ca=ca, cert=cert, key=key,
                                user=pwd.getpwuid(os.getuid()).pw_name))
    return conf
