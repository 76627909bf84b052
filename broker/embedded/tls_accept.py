"""The embedded broker's TLS handshake, done by the broker instead of by asyncio's server,
so that the CONNECT deadline covers it and a failed one is logged.

Measured against amqtt 0.12.1 (asyncio's ``start_server(ssl=...)``) over real TCP:

- A client that opened the TLS port and sent nothing, or stopped half way through the
  handshake, held its socket for asyncio's fixed 60 s handshake timeout, whatever
  ``connect_timeout_s`` said (3 s in the test), and only then began the CONNECT wait:
  a slowloris on the TLS port held each file descriptor 4 times as long as on the plain
  one. Now handshake and CONNECT together have ``connect_timeout_s``.
- A TLS connection the broker closed (a take-over by a new connection of the same
  client, a protocol violation) waited up to 30 s for the client's close_notify before
  its socket was closed; 3 s now (`SHUTDOWN_TIMEOUT_S`).
- A client with no certificate where one is required, a certificate from another CA,
  or plain MQTT sent to the TLS port was closed without a word in the log (asyncio logs
  handshake errors only in debug mode), so an operator could not tell why a device never
  connected. Now each failure logs one line with the peer, OpenSSL's reason and what to
  do (``log_limits`` bounds how many).

- Each TLS connection held asyncio's 256 KiB read buffer from its first moment, so a
  crowd of handshakes never finished cost ~315 KB each; 32 KiB now (`READ_BUFFER`).
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from typing import Any

import structlog

from broker.embedded.client_limits import drop_connection

__all__ = ["handshake", "hint_for"]

log = structlog.get_logger("broker.embedded.amqtt_broker")

_HINTS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": (
        "this listener requires a client certificate (tls require_client_cert) and the "
        "client sent none: give the device its certificate (waystation device add / "
        "renew-cert) and set it in its [mqtt.tls] cert_file and key_file"),
    "CERTIFICATE_VERIFY_FAILED": (
        "the client's certificate is not signed by this listener's CA (tls ca_file) or has "
        "expired: issue the device a new one from that CA (waystation device renew-cert)"),
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the client does not trust the broker's certificate: give it the CA that signed "
        "tls cert_file (its [mqtt.tls] ca_file)"),
    "BAD_CERTIFICATE": (
        "the client refused the broker's certificate: check that tls cert_file names this "
        "host (its address or DNS name) and has not expired"),
}
_NOT_TLS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNSUPPORTED_PROTOCOL",
            "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNEXPECTED_RECORD")
READ_BUFFER = 32 * 1024
"""Bytes asyncio reads from a TLS socket at once: two full TLS records. asyncio allocates
256 KiB per TLS connection up front, so each one waiting for its handshake held ~315 KB
of the broker (measured: 600 hostile sockets, 400 of them waiting, grew it by 155 MB)."""
SHUTDOWN_TIMEOUT_S = 3.0
"""How long a TLS connection the broker closes waits for the client's close_notify."""
_CLOSED = ("UNEXPECTED_EOF_WHILE_READING", "EOF")
_NOT_TLS_HINT = ("the client did not speak TLS (plain MQTT or something else on the TLS "
                 "port): point it at the plain port or turn TLS on in its config")
_OTHER_HINT = ("the client's TLS settings do not match the listener's (TLS 1.2 or later, "
               "a CA both trust): check them; a scanner needs nothing done")


class _SmallBufferTLS(sslproto.SSLProtocol):
    """asyncio's TLS protocol with a read buffer of `READ_BUFFER` bytes, not 256 KiB."""

    max_size = READ_BUFFER


async def _start_tls(writer: asyncio.StreamWriter, context: ssl.SSLContext,
                     handshake_s: float) -> None:
    """`StreamWriter.start_tls` and `loop.start_tls` of Python 3.11, with two changes:
    a shutdown timeout (asyncio waited 30 s for the client's close_notify when the
    broker closed a TLS connection, a take-over or a refusal, so a client that never
    answers held its socket that long: measured, 9 taken-over connections still open
    12 s later), and a small read buffer (`_SmallBufferTLS`)."""
    loop = asyncio.get_running_loop()
    stream: Any = writer  # the transport and protocol are asyncio's own, not typed
    protocol, transport = stream._protocol, stream.transport
    waiter = loop.create_future()
    make: Any = _SmallBufferTLS  # typeshed says int seconds; asyncio takes float
    tls = make(loop, protocol, context, waiter, True, None,
               ssl_handshake_timeout=handshake_s, ssl_shutdown_timeout=SHUTDOWN_TIMEOUT_S,
               call_connection_made=False)
    # As loop.start_tls: stop reading until the TLS protocol is in place.
    transport.pause_reading()
    transport.set_protocol(tls)
    made = loop.call_soon(tls.connection_made, transport)
    resumed = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resumed.cancel()
        raise
    stream._transport = tls._app_transport
    protocol._replace_writer(writer)


def hint_for(reason: str) -> str:
    """What an operator should do about a handshake that failed with OpenSSL `reason`."""
    if reason in _HINTS:
        return _HINTS[reason]
    if reason in _NOT_TLS:
        return _NOT_TLS_HINT
    return _OTHER_HINT


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    context: ssl.SSLContext, timeout_s: float, peer: Any) -> bool:
    """Run the server side of the TLS handshake on `writer`'s connection within
    `timeout_s`; False (connection closed, one line logged) when it fails.

    Call it before anything awaits on a new connection, and it must not await before
    `start_tls` stops reading the plain socket either (so no `wait_for`, which starts
    a task): bytes read into the plain stream meanwhile would be lost to the handshake
    (measured: with `wait_for` a client sending its ClientHello at once hung)."""
    host = peer[0] if isinstance(peer, tuple) and peer else str(peer)
    try:
        async with asyncio.timeout(max(timeout_s, 0.0)):
            if getattr(reader, "_buffer", None):
                raise ssl.SSLError("bytes read before the TLS handshake began")
            await _start_tls(writer, context, max(timeout_s, 0.1) + 1.0)
    except TimeoutError:
        drop_connection(writer)
        # a warning: log_limits bounds those (a slowloris makes one per connection)
        log.warning("TLS handshake not finished in time: connection closed", peer=host,
                 waited_s=round(timeout_s, 1),
                 hint="a client that opens the TLS port and does not complete the "
                      "handshake within connect_timeout_s: a scanner, or a link too slow "
                      "for it (then raise connect_timeout_s)")
        return False
    except (ssl.SSLError, OSError) as exc:
        drop_connection(writer)
        reason = str(getattr(exc, "reason", None) or type(exc).__name__)
        if isinstance(exc, ssl.SSLEOFError | ConnectionError) or reason in _CLOSED:
            # closed before or during the handshake: a TCP health check, a port scan
            log.debug("TLS connection closed during the handshake", peer=host, reason=reason)
            return False
        log.warning("TLS handshake failed: connection closed", peer=host, reason=reason,
                    error=str(exc)[:200], hint=hint_for(reason))
        return False
    return True
