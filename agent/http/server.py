"""The local API server: aiohttp on a Unix socket in the store's directory and, when
configured, on loopback TCP, on its own thread and event loop.

    server = ApiServer(cfg, agent, tokens=TokenStore(cfg.data_dir))
    server.start()          # returns once every socket listens (raises ApiStartError)
    ...
    server.stop()

The socket is bound under a temporary name, given its mode (`api.socket_mode`), then
renamed into place, so it is never reachable with a looser mode. Store calls run on a
small thread pool (LMDB commits wait for the disk; the event loop never does). Every
answer that is not a success is JSON ``{status, code, message}`` (`agent.http.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from agent.api import Agent
from agent.clientcert import client_cert_status
from agent.errors import AgentError
from agent.http import cors
from agent.http import idempotency as idem
from agent.http.auth import APP, TokenFileError, TokenStore
from agent.http.conn_limits import HEAD_LIMITS, LINGER_S, ConnLimiter, read_body
from agent.http.errors import ApiError, from_agent_error, schema_hint
from agent.http.feed import FeedHub
from agent.http.inputs import check_path
from agent.http.routes import ROUTES, Context, Route
from waystation.config import AgentConfig

log = structlog.get_logger("waystation.agent.http")

T = TypeVar("T")
SOCKET_NAME = "api.sock"
_MAX_AF_UNIX = 107
_STORE_THREADS = 8
"""Threads running the requests' store calls."""


class ApiStartError(AgentError):
    """The local API could not listen (socket path, port in use, ...)."""

    exit_code = 2


class ApiServer:
    """The local API of one open agent (see the module docstring)."""

    def __init__(self, cfg: AgentConfig, agent: Agent, *, tokens: TokenStore | None = None,
                 sync_running: Callable[[], bool] = lambda: False,
                 tcp_port: int | None = None) -> None:
        self.cfg = cfg
        self.agent = agent
        self.tokens = tokens if tokens is not None else TokenStore(Path(cfg.data_dir))
        self.sync_running = sync_running
        self.socket_path: Path | None = (Path(cfg.data_dir) / SOCKET_NAME
                                         if cfg.api.socket else None)
        self._tcp_port = cfg.api.tcp_port if tcp_port is None else tcp_port
        self.tcp_address: tuple[str, int] | None = None
        # Writes of concurrent requests share one durable commit (agent.groupcommit):
        # a thread waiting for its group's flush costs no CPU, so more threads than
        # cores let more writes share each flush.
        self._pool = ThreadPoolExecutor(max_workers=_STORE_THREADS, thread_name_prefix="api-store")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._beat = time.monotonic()
        self._hub: FeedHub | None = None
        self._limiter: ConnLimiter | None = None

    @property
    def open_connections(self) -> int:
        """Connections open now (bounded by api.max_connections)."""
        return 0 if self._limiter is None else self._limiter.open_connections

    @property
    def feed_clients(self) -> int:
        """Feed (SSE) clients connected now."""
        return 0 if self._hub is None else self._hub.clients

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="agent-api", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise ApiStartError("the local API did not start within "
                                f"{timeout} s")
        if self._start_error is not None:
            err = self._start_error
            if isinstance(err, AgentError):
                raise err
            raise ApiStartError(f"the local API could not start: {err}") from err

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(15)
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def healthy(self) -> bool:
        """The event loop turned in the last 30 s (feeds the systemd watchdog)."""
        return self._thread is not None and self._thread.is_alive() and (
            time.monotonic() - self._beat < 30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._started.is_set():
                self._start_error = exc
            else:
                log.exception("api_server_failed")
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        hub = self._hub = FeedHub(self.agent, self._blocking)
        ctx = Context(agent=self.agent, blocking=self._blocking, hub=hub,
                      max_feed_clients=self.cfg.api.max_feed_clients,
                      feed_idle_timeout_s=self.cfg.api.feed_idle_timeout_s,
                      sync_running=self.sync_running,
                      client_cert=partial(client_cert_status, self.cfg),
                      idempotency_keep_s=self.cfg.api.idempotency_keep_s,
                      idempotency_max_keys=self.cfg.api.idempotency_max_keys)
        api = self.cfg.api
        # The connection handlers' settings: the idle timeout is aiohttp's keep-alive
        # timer, which also runs from a connection's start (a head never completed);
        # after an answer that left a body unread (408, 413, 401) the rest is read and
        # dropped for at most LINGER_S before the connection closes (aiohttp: 10 s).
        handler_kwargs: dict[str, Any] = {"access_log": None,
                                          "keepalive_timeout": api.idle_timeout_s,
                                          "lingering_time": LINGER_S, **HEAD_LIMITS}
        limiter = self._limiter = ConnLimiter(
            max_connections=api.max_connections, handler_kwargs=handler_kwargs,
            send_timeout_s=api.send_timeout_s,
            cors=cors.Cors(api.cors_origins) if api.cors_origins else None)
        app = build_app(ctx, self.tokens, self._blocking, api.max_body_bytes,
                        cors_origins=api.cors_origins, body_timeout_s=api.body_timeout_s,
                        limiter=limiter)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=2.0,
                               **handler_kwargs)
        await runner.setup()
        assert runner.server is not None
        limiter.bind(runner.server, asyncio.get_running_loop())
        self._runner = runner
        tasks = [asyncio.create_task(hub.run(), name="feed-hub"),
                 asyncio.create_task(self._heartbeat(), name="api-heartbeat")]
        listeners: list[asyncio.Server] = []
        try:
            await self._listen(limiter, listeners)
            self._started.set()
            log.info("api_listening", socket=str(self.socket_path) if self.socket_path else None,
                     tcp=f"{self.tcp_address[0]}:{self.tcp_address[1]}"
                     if self.tcp_address else None)
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for listener in listeners:  # stop accepting; the runner closes the connections
                listener.close()
            await runner.cleanup()
            if self.socket_path is not None:
                with contextlib.suppress(OSError):
                    self.socket_path.unlink()

    async def _listen(self, limiter: ConnLimiter, listeners: list[asyncio.Server]) -> None:
        # Not aiohttp's sites: their protocol factory is the runner's server, unbounded.
        loop = asyncio.get_running_loop()
        if self.socket_path is not None:
            sock = _bind_unix(self.socket_path, self.cfg.api.socket_mode)
            listeners.append(await loop.create_server(limiter, sock=sock))
        if self._tcp_port is not None:
            host = self.cfg.api.tcp_host
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            tcp = socket.socket(family, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((host if host != "localhost" else "127.0.0.1", self._tcp_port))
                tcp.listen(128)
            except OSError as exc:
                tcp.close()
                raise ApiStartError(f"the local API cannot listen on {host}:{self._tcp_port}: "
                                    f"{exc.strerror or exc} (api.tcp_port)") from None
            self.tcp_address = tcp.getsockname()[:2]
            listeners.append(await loop.create_server(limiter, sock=tcp))

    async def _heartbeat(self) -> None:
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(1.0)

    async def _blocking(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)


def _bind_unix(path: Path, mode: int) -> socket.socket:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dir_fd: int | None = None
    try:
        if len(os.fsencode(tmp)) <= _MAX_AF_UNIX:
            sock.bind(str(tmp))
        else:
            # Longer than sun_path allows: bind through the directory's fd (Linux), so
            # the service still starts; clients need a path that fits (a symlink).
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            sock.bind(f"/proc/self/fd/{dir_fd}/{tmp.name}")
            log.warning("api_socket_path_long", path=str(path),
                        hint="clients connect through a shorter path, e.g. a symlink")
        os.chmod(tmp, mode)
        sock.listen(128)
        os.replace(tmp, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ApiStartError(f"the local API cannot listen on {path}: "
                            f"{exc.strerror or exc}") from None
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock


# ---------------------------------------------------------------------- the app


def build_app(ctx: Context, tokens: TokenStore,
              blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
              max_body_bytes: int, *, cors_origins: Sequence[str] = (),
              body_timeout_s: float = 30.0,
              limiter: ConnLimiter | None = None) -> web.Application:
    middlewares = [_errors_middleware(max_body_bytes, lambda: ctx.agent.catalog.version),
                   _auth_middleware(tokens, blocking, body_timeout_s)]
    if limiter is not None:
        middlewares.insert(0, limiter.middleware())
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    for route in ROUTES:
        app.router.add_route(route.method, route.path, _bind(route, ctx))
    cors.install(app, cors_origins)  # (a preflight is answered before the token check)
    return app


def _bind(route: Route, ctx: Context) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await route.handler(request, ctx)

    if not route.writes:
        return handle
    return idem.guard(handle, ctx.agent, ctx.blocking, ctx.idempotency_keep_s,
                      ctx.idempotency_max_keys)




def _errors_middleware(max_body_bytes: int, schema_version: Callable[[], int]) -> Middleware:
    @web.middleware
    async def errors(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            length = request.content_length
            if length is not None and length > max_body_bytes:
                raise ApiError(413, "body_too_large",
                               f"the body has {length} bytes; at most {max_body_bytes} are "
                               "accepted (api.max_body_bytes)")
            if request.match_info.http_exception is None and request.match_info:
                check_path(request)  # a route with path parameters: their %XX bytes
            return await handler(request)
        except ApiError as err:
            return schema_hint(err, schema_version).response()
        except web.HTTPRequestEntityTooLarge:
            return ApiError(413, "body_too_large", f"the body is over {max_body_bytes} "
                                                   "bytes (api.max_body_bytes)").response()
        except web.HTTPNotFound:
            return ApiError(404, "not_found", f"no route {request.path[:200]!r}: see "
                                              "docs/agent-api.openapi.json").response()
        except web.HTTPMethodNotAllowed as exc:
            allowed = ", ".join(sorted(exc.allowed_methods))
            return ApiError(405, "method_not_allowed",
                            f"{request.method} is not allowed on {request.path[:200]!r} "
                            f"(allowed: {allowed})", headers={"Allow": allowed}).response()
        except web.HTTPException as exc:
            return ApiError(exc.status, exc.reason.lower().replace(" ", "_"),
                            exc.text or exc.reason).response()
        except TokenFileError as exc:
            return ApiError(503, "tokens_unavailable", str(exc)).response()
        except AgentError as exc:
            return schema_hint(from_agent_error(exc), schema_version).response()
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("api_request_failed", method=request.method, path=request.path)
            return ApiError(500, "internal", "the agent failed to answer this request; "
                                             "its log has the details").response()

    return errors


def _auth_middleware(tokens: TokenStore,
                     blocking: Callable[[Callable[[], Any]], Awaitable[Any]],
                     body_timeout_s: float) -> Middleware:
    @web.middleware
    async def auth(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            raise request.match_info.http_exception
        header = request.headers.get("Authorization")
        if header is None:
            raise ApiError(401, "unauthorized", "send an app token: Authorization: Bearer "
                                                "<token> (waystation agent token add APP)",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme = header.partition(" ")[0]
        if scheme.lower() != "bearer":
            # A token pasted without its scheme (or Basic auth) is not "mistyped": say how
            # to send it, without echoing the secret.
            got = "the token alone" if scheme.startswith("wst_") else f"{scheme[:20]!r}"
            raise ApiError(401, "unauthorized", f"send the app token as Authorization: "
                                                f"Bearer <token> (got {got})",
                           headers={"WWW-Authenticate": "Bearer"})
        app = await blocking(partial(tokens.verify, header))
        if app is None:
            raise ApiError(401, "unauthorized", "the app token is not valid (removed, or "
                                                "mistyped): issue one with `waystation agent "
                                                "token add`",
                           headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        request[APP] = app
        try:  # (after the token check: only an app's body is read, up to max_body_bytes)
            await read_body(request, body_timeout_s)
        except TimeoutError:
            resp = ApiError(408, "body_timeout", f"the body did not arrive within "
                                                 f"{body_timeout_s:g} s (api.body_timeout_s)"
                            ).response()
            resp.force_close()
            return resp
        return await handler(request)

    return auth


__all__ = ["SOCKET_NAME", "ApiServer", "ApiStartError", "build_app"]
