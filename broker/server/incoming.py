"""An up message on its way through a round: parsed, checked, and classified.

Pure over the registry: `parse_up` decodes one payload from `{prefix}/{dev}/up`,
checks it against the topic and the registry (PROTOCOL.md §10.1) and says what kind
it is, or why it is refused, or why the device may not sync now. The engine then
applies and answers it; `held_back` is what a blocked device's batch gets meanwhile,
`dead_letters_for` what the round keeps of it for the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from broker.server.applier import ChangeResult
from broker.server.caps import agreed, served_now
from broker.server.recent import RecentTraffic, read_plain
from broker.server.registry import Registry
from broker.server.replies import batch_letters, letter
from broker.server.store.base import CommandRow, DeadLetter, DeviceRow
from schemas import codec, zdict_recent, zdict_schema
from schemas.codec import BadChange, LenientChanges
from schemas.errors import ProtocolError
from schemas.payload import DEFAULT_MAX_DECOMPRESSED, payload_bytes
from schemas.wire import UP_TYPES, Catchup, Change, Csr, Fetch, FetchQuery, Hello
from waystation.config import MergeConfig

log = structlog.get_logger(__name__)


@dataclass(slots=True, eq=False)
class Incoming:
    """One up message on its way through a round."""

    topic_dev: str
    payload: bytes
    kind: str = ""
    device: DeviceRow | None = None
    msg: Any = None
    error: tuple[str, str] | None = None
    results: list[ChangeResult] = field(default_factory=list)
    commands: list[CommandRow] = field(default_factory=list)
    answer: bytes = b""
    """The reply worked out inside the transaction (a `csr`'s `cert`)."""
    failed: bool = False
    blocked: str = ""
    """Why the device may not sync now (disabled, wipe pending); "" when it may."""
    caps: tuple[str, ...] = ()
    """A hello's features as agreed (`broker.server.caps.agreed`), worked out once, with
    what this server served when it read the hello: the welcome says them, the device's
    row keeps them, the pending commands are picked by them."""


def block_reason(device: DeviceRow, *, wipe_done: bool = False) -> str:
    """Why `device` may not sync now ("" when it may); `wipe_done`: its wipe is known to
    be carried out although `device` (read before) still says pending."""
    if device.wipe_pending and not wipe_done:
        return (f"device {device.id!r} has a wipe pending: it gets no data until it has "
                "carried the wipe out")
    if not device.enabled:
        return (f"device {device.id!r} is disabled by the operator: its changes stay on the "
                "device and are sent again once it is re-enabled "
                f"(`waystation device enable {device.id}`)")
    return ""


def wiped_in_group(incs: list[Incoming]) -> None:
    """A hello that reports the device's wipe done ends the wipe's block for the device's
    later messages of the same group (all were parsed before it was applied): they are
    judged as they would be in a group of their own, so a new store's first catch-up is
    told the truth (disabled until the operator enables it) rather than "wipe pending"."""
    wiped: set[str] = set()
    for inc in incs:
        device = inc.device
        if inc.error is not None or device is None or not device.wipe_pending:
            continue
        if inc.kind == "hello" and device.wipe_id in inc.msg.done:
            wiped.add(device.id)
        elif inc.blocked and device.id in wiped:
            inc.blocked = block_reason(device, wipe_done=True)


def parse_up(topic_dev: str, payload: bytes, registry: Registry,
             cfg: MergeConfig, recent: RecentTraffic | None = None,
             served: frozenset[str] | None = None) -> Incoming:
    """Decode and check one up message; refusals land in `Incoming.error`. With `recent`
    (this server keeps `zd3` references) the change batches of devices that agreed to it
    are kept as their references, and `Incoming.payload` is the message's JSON text.
    `served`: the features a hello may agree to now (default: all this server has,
    `zd3` only with `recent`)."""
    inc = Incoming(topic_dev, payload)
    plain: bytes | None = None
    try:
        limit = cfg.max_payload_bytes
        if recent is not None:
            data = payload_bytes(payload, limit)
            plain = read_plain(recent, topic_dev, registry.get(topic_dev), data,
                               DEFAULT_MAX_DECOMPRESSED)
            if plain is not None:
                # The text, not the stream: a dead letter must be readable once the
                # references it was compressed with are gone.
                inc.payload = payload = plain
                limit = max(limit, len(plain))
        msg = codec.decode_lenient(payload, allowed=UP_TYPES, max_payload=limit)
    except ProtocolError as err:
        inc.error = (err.code, err.reason)
        return inc
    except Exception:  # pragma: no cover - the codec raises ProtocolError only
        log.exception("decode_failed", dev=topic_dev)
        inc.error = (codec.SERVER_ERROR, "the server failed to decode this message")
        return inc
    dev: str = msg.dev  # type: ignore[union-attr]
    if dev != topic_dev:
        inc.error = (codec.WRONG_DEVICE, f"message says dev {dev!r} but was published on "
                                         f"the up topic of {topic_dev!r}")
        return inc
    device = registry.get(dev)
    if device is None:
        inc.error = (codec.UNKNOWN_DEVICE, f"device {dev!r} is not registered: enrol it "
                                           "with `waystation device add`")
        return inc
    inc.blocked = block_reason(device)
    inc.device = device
    inc.msg = msg
    if isinstance(msg, LenientChanges):
        count = len(msg.bad) + (len(msg.changes.ch) if msg.changes is not None else 0)
        if count > cfg.max_batch_changes:
            inc.error = (codec.TOO_LARGE, f"ch: {count} changes in one batch, this server "
                                          f"takes at most {cfg.max_batch_changes}; "
                                          "split the batch")
            return inc
        inc.kind = "changes"
        if plain is not None and recent is not None:
            first = _first_number(msg)
            if first is not None:
                recent.add(dev, first, plain)
    elif isinstance(msg, Hello):
        inc.kind = "hello"
        if served is None:
            served = served_now(recent_kept=recent is not None, other_servers=0)
        inc.caps = agreed(msg.caps or (), zd=msg.zd, served=served)
        if recent is not None:
            base = (zdict_schema.lookup(msg.zd)
                    if msg.zd is not None and zdict_recent.CAP in inc.caps else None)
            if base is not None:
                recent.open(dev, base)
            else:
                # Not agreed (not offered, not with `zd2`, not served now): nothing of
                # this device is kept or read as `zd3` any more, whatever an earlier
                # hello agreed.
                recent.forget(dev)
    elif isinstance(msg, Catchup):
        inc.kind = "catchup"
    elif isinstance(msg, Fetch):
        inc.kind = "fetch"
    elif isinstance(msg, Csr):
        inc.kind = "csr"
    elif isinstance(msg, FetchQuery):
        inc.kind = "fetchq"
    else:  # pragma: no cover - UP_TYPES has exactly these five
        inc.error = (codec.UNKNOWN_TYPE, "not accepted on the up topic")
    return inc


def _first_number(msg: LenientChanges) -> int | None:
    """The number of the batch's first entry (the device's name for the message)."""
    if msg.bad and msg.bad[0].index == 0:
        return msg.bad[0].n
    return msg.changes.ch[0].n if msg.changes is not None else None


def dead_letters_for(inc: Incoming, now: int) -> list[DeadLetter]:
    """What one handled up message leaves for the operator: the refused message, or the
    refused changes of its batch. A stream made with references the server no longer
    holds is not a fault of the message: the device sends it again (`zd2`)."""
    if inc.error is not None and inc.error[0] == codec.DICTIONARY_UNKNOWN:
        out = []
    elif inc.error is not None:
        out = [letter(inc.topic_dev, "up", *inc.error, inc.payload, now)]
    elif inc.blocked:
        out = []  # counted (held_back), not kept: the device sends them again later
    elif inc.kind == "changes":
        out = batch_letters(inc.topic_dev, inc.results, inc.msg.bad, inc.payload, now)
    else:
        out = []
    return out


def held_back(changes: Sequence[Change], bad: Sequence[BadChange],
              reason: str) -> list[ChangeResult]:
    """Every change of a blocked device's batch, refused for now (`device_disabled`,
    transient: the device keeps them and sends them again with backoff)."""
    numbers = [ch.n for ch in changes] + [b.n for b in bad if b.n is not None]
    return [ChangeResult(n, code=codec.DEVICE_DISABLED, reason=reason, perm=False)
            for n in numbers]


__all__ = ["Incoming", "block_reason", "dead_letters_for", "held_back", "parse_up",
           "wiped_in_group"]
