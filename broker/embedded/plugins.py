"""amqtt 0.12.1 plugins that give the embedded broker Waystation's auth and ACL.

amqtt loads plugins from the ``plugins`` section of its broker config: a mapping from the
dotted class path to that plugin's options, which amqtt turns into the plugin's inner
``Config`` dataclass (strictly: unknown keys are an error). Listing plugins there replaces
amqtt's defaults (anonymous auth, $SYS, loggers), so only these two run. ``plugin_config``
builds that section.

- ``PasswordFileAuthPlugin``: Mosquitto-format password file (``broker.embedded.passwords``),
  re-read whenever the file changes, so ``device add`` takes effect without a restart.
  A device (any user not in ``server_users``) must connect with client id == username,
  and its last will, if any, must be a topic it may publish on: amqtt publishes wills
  without a topic check, so this is where a device is stopped from planting a will on
  another device's topics. Optionally (``trust_client_cert_cn``) a verified TLS client
  certificate whose CN is the username stands in for the password.
- ``AclTopicPlugin``: applies ``broker.embedded.acl.allowed`` to publish, subscribe and receive.

What amqtt does with a refusal (measured, amqtt 0.12.1): a denied SUBSCRIBE gets return
code 0x80 in its SUBACK; a denied PUBLISH is still PUBACKed and then silently dropped
(the connection stays up); a denied receive silently skips that subscriber.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from amqtt.contexts import Action as AmqttAction
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from broker.embedded.acl import allowed
from broker.embedded.passwords import (
    overlap_path,
    read_overlap,
    read_password_file,
    verify_password,
)
from waystation.errors import ConfigError

__all__ = ["AclTopicPlugin", "PasswordFileAuthPlugin", "PasswordStore", "plugin_config"]

log = structlog.get_logger(__name__)
_V = TypeVar("_V")

AUTH_PLUGIN = f"{__name__}.PasswordFileAuthPlugin"
TOPIC_PLUGIN = f"{__name__}.AclTopicPlugin"


def plugin_config(
    *,
    password_file: str | os.PathLike[str],
    prefix: str,
    server_users: set[str] | frozenset[str] | list[str],
    allow_anonymous: bool = False,
    trust_client_cert_cn: bool = False,
    check_threads: int = 1,
) -> dict[str, dict[str, Any]]:
    """The ``plugins`` section of an amqtt broker config that installs our two plugins."""
    users = sorted(server_users)
    return {
        AUTH_PLUGIN: {
            "password_file": os.fspath(password_file),
            "server_users": users,
            "allow_anonymous": allow_anonymous,
            "prefix": prefix,
            "trust_client_cert_cn": trust_client_cert_cn,
            "check_threads": check_threads,
        },
        TOPIC_PLUGIN: {"prefix": prefix, "server_users": users},
    }


class PasswordStore:
    """The users of one password file, re-read when the file's identity or mtime changes,
    and the extra hashes of its overlap file (passwords under rotation)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._main: _Watched[str] = _Watched(self.path, read_password_file, missing_warns=True)
        self._overlap: _Watched[list[str]] = _Watched(os.fspath(overlap_path(self.path)),
                                                     read_overlap, missing_warns=False)

    def lookup(self, user: str) -> str | None:
        """The stored hash for ``user``, after re-reading the file if it changed."""
        return self._main.get().get(user)

    def hashes(self, user: str) -> list[str]:
        """Every hash ``user`` may log in with: the password file's, then the overlap's."""
        main = self.lookup(user)
        return ([] if main is None else [main]) + list(self._overlap.get().get(user, []))


class _Watched(Generic[_V]):
    """One file's parsed content, re-read when its identity, size or times change."""

    def __init__(self, path: str, reader: Callable[[str], dict[str, _V]], *,
                 missing_warns: bool) -> None:
        self.path = path
        self._reader = reader
        self._missing_warns = missing_warns
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, _V] = {}

    def get(self) -> dict[str, _V]:
        self._refresh()
        return self._users

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._missing_warns and (self._stamp is not None or self._users):
                log.warning("password file missing; nobody can log in", path=self.path)
            self._stamp, self._users = None, {}
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        if stamp == self._stamp:
            return
        try:
            users = self._reader(self.path)
        except (OSError, ConfigError) as exc:
            # Keep serving the last good copy rather than locking everybody out.
            log.error("cannot read password file; keeping previous users", path=self.path,
                      error=str(exc))
            return
        self._stamp, self._users = stamp, users
        log.info("password file loaded", path=self.path, users=len(users))


def _peer_common_name(session: Any) -> str | None:
    """The CN of a verified TLS client certificate on this session, if any."""
    ssl_object = getattr(session, "ssl_object", None)
    if ssl_object is None:
        return None
    try:
        cert = ssl_object.getpeercert()
    except ValueError:  # handshake not done
        return None
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class PasswordFileAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt auth plugin: Mosquitto password file, client id == username for devices."""

    @dataclass
    class Config:
        """Options, as given under this plugin's key in the broker config."""

        password_file: str = ""
        server_users: list[str] = field(default_factory=list)
        allow_anonymous: bool = False
        prefix: str = "waystation"
        trust_client_cert_cn: bool = False
        """Accept a verified TLS client certificate whose CN is the username instead of a
        password. Only sensible when the listener trusts nothing but the fleet's own CA."""
        check_threads: int = 1
        """Passwords checked at once, each on a thread (hashlib lets go of the GIL)."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._store = PasswordStore(self.config.password_file)
        self._server_users = frozenset(self.config.server_users)
        self._checks: asyncio.Semaphore | None = None

    async def authenticate(self, *, session: Any) -> bool | None:
        """True to accept the CONNECT, False to refuse it (CONNACK 5, not authorized).

        The password hash runs on a thread, at most `check_threads` at once: on the event
        loop a slow hash (raised ``iterations``) stalled every device's traffic for each
        login tried (a 2,000-attempt wrong-password flood: bench/login_flood.py)."""
        who = self._identify(session)
        if isinstance(who, bool):
            return who
        username, common_name, hashes = who
        if self._checks is None:
            self._checks = asyncio.Semaphore(max(1, self.config.check_threads))
        matched = bool(hashes) and common_name == username
        if hashes and not matched:
            async with self._checks:
                matched = await asyncio.to_thread(_matches, hashes, session.password or "")
        return self._conclude(session, username, matched)

    def check(self, session: Any) -> bool:
        """The decision for one CONNECT, synchronously (the password checked here)."""
        who = self._identify(session)
        if isinstance(who, bool):
            return who
        username, common_name, hashes = who
        matched = bool(hashes) and (common_name == username
                                    or _matches(hashes, session.password or ""))
        return self._conclude(session, username, matched)

    def _identify(self, session: Any) -> bool | tuple[str, str | None, list[str]]:
        """The decision when no password needs checking (anonymous, no username), else
        (username, certificate CN, the hashes it may log in with)."""
        username: str | None = session.username
        common_name = _peer_common_name(session) if self.config.trust_client_cert_cn else None
        if not username and common_name:
            username = session.username = common_name
        if not username:
            if self.config.allow_anonymous:
                session.is_anonymous = True
                return True
            log.info("refused: no username", client_id=session.client_id)
            return False
        # Enrolment (a line in the password file) is needed either way, so removing the
        # line revokes a device even when it authenticates with a certificate.
        return username, common_name, self._store.hashes(username)

    def _conclude(self, session: Any, username: str, authenticated: bool) -> bool:
        """The checks after the password's: client id and last will."""
        client_id: str | None = session.client_id
        if not authenticated:
            log.info("refused: bad username or password", user=username, client_id=client_id)
            return False
        if username not in self._server_users and client_id != username:
            log.warning("refused: device client id differs from its username",
                        user=username, client_id=client_id)
            return False
        if session.will_flag and not allowed(
            username,
            session.will_topic or "",
            "publish",
            prefix=self.config.prefix,
            server_users=self._server_users,
        ):
            log.warning("refused: last will on a topic the user may not publish",
                        user=username, topic=session.will_topic)
            return False
        return True


def _matches(hashes: list[str], password: str) -> bool:
    return any(verify_password(stored, password) for stored in hashes)


class AclTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic plugin applying ``broker.embedded.acl.allowed``."""

    @dataclass
    class Config:
        """Options, as given under this plugin's key in the broker config."""

        prefix: str = "waystation"
        server_users: list[str] = field(default_factory=list)

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._server_users = frozenset(self.config.server_users)

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Any = None
    ) -> bool:
        """True when the session's user may perform ``action`` on ``topic``."""
        if session is None or topic is None or action is None:
            return False
        name = action.value if isinstance(action, AmqttAction) else str(action)
        ok = allowed(
            session.username,
            topic,
            name,
            prefix=self.config.prefix,
            server_users=self._server_users,
        )
        if not ok and name != "receive":
            log.info("acl denied", user=session.username, action=name, topic=topic)
        return ok
