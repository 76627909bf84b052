"""What the sender of one up message is answered once its group committed.

    message_replies(inc, fan, welcome, blocked_reads=...) -> [message bytes, ...]

Pure: built from what the group's transaction left on the `Incoming` (`results`,
`commands`, `answer`, `error`); the engine compresses them for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from broker.server.fanout import Fanout
from broker.server.incoming import Incoming
from broker.server.messages import command_message, error_message, reject_messages, rejection
from broker.server.replies import change_replies
from schemas import codec
from schemas.codec import LenientChanges


def message_replies(inc: Incoming, fan: Fanout,
                    welcome: Callable[[tuple[str, ...], int], list[bytes]], *,
                    blocked_reads: Collection[str]) -> list[bytes]:
    """What the sender of `inc` is answered once its group committed (uncompressed):
    refusals, the `welcome` and pending commands for a `hello`, acks and rejects for a
    change batch, the signed certificate for a `csr`. Catch-ups and fetches are read
    and answered separately (`broker.server.catchup`), unless the device is disabled."""
    if inc.failed and inc.kind == "changes" and inc.error is None:
        lc: LenientChanges = inc.msg
        numbers = [c.n for c in lc.changes.ch] if lc.changes is not None else []
        return reject_messages([rejection(n, codec.SERVER_ERROR, "the server failed to "
                                          "apply this change; send it again later", False)
                                for n in numbers])
    if inc.kind in blocked_reads and inc.blocked:
        return [error_message(codec.DEVICE_DISABLED, inc.blocked)]
    if inc.error is not None or inc.failed:
        code, reason = inc.error or (codec.SERVER_ERROR, "the server failed to handle "
                                                         "this message")
        return [error_message(code, reason)]
    if inc.kind == "hello":
        msgs = [command_message(c.id, c.cmd, c.args) for c in inc.commands]
        if inc.msg.caps is not None:  # a device that speaks §11 is told what is agreed
            msgs[:0] = welcome(inc.caps, inc.msg.sv)
        return msgs
    if inc.kind == "changes":
        return change_replies(inc.topic_dev, inc.results, inc.msg.bad, fan)
    if inc.kind == "csr":
        return [inc.answer]
    return []  # pragma: no cover - catch-ups are answered separately


__all__ = ["message_replies"]
