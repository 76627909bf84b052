"""broker.embedded.conn_table and broker.embedded.login_guard: the pure decisions of fix
11 (connections per source and in all; failed logins), with Hypothesis."""

from __future__ import annotations

import ipaddress
import resource
import subprocess
import sys
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.embedded.conn_guard import FD_RESERVE, fitting_total
from broker.embedded.conn_table import (
    MAX_CONNECTIONS,
    ConnectionTable,
    ConnLimits,
    Ticket,
    source_of,
)
from broker.embedded.login_guard import (
    KNOWN_GOOD_S,
    SOURCE_WINDOW_S,
    LoginGuard,
    LoginLimits,
)
from broker.embedded.settings import BrokerSettings
from waystation.config import BrokerConfig

SOURCES = st.sampled_from(["10.0.0.1", "10.0.0.2", "2001:db8::/64", "?"])
CONN_OPS = st.lists(st.tuples(st.sampled_from(["open", "login", "close"]), SOURCES,
                              st.integers(0, 50)), max_size=200)


@given(per=st.integers(1, 5), total=st.integers(1, 12), ops=CONN_OPS)
def test_the_connection_table_never_passes_its_bounds(per: int, total: int,
                                                      ops: list[tuple[str, str, int]]) -> None:
    """Any sequence of connections opening, logging in and closing (twice, too): never more
    than `total` open nor `per` of one source logging in; the counts match the live
    tickets and the table holds only sources with a connection logging in."""
    table = ConnectionTable(ConnLimits(connecting_per_source=per, total=total))
    live: list[Ticket] = []
    for op, source, pick in ops:
        if op == "open":
            got = table.open(source)
            waiting = sum(1 for t in live if t.source == source and not t.logged_in)
            if len(live) < total and waiting < per:
                assert isinstance(got, Ticket)
                live.append(got)
            else:
                assert isinstance(got, str)
                assert ("max_connections" in got) == (len(live) >= total)
        elif live:
            ticket = live[pick % len(live)]
            if op == "login":
                table.logged_in(ticket)
            else:
                table.close(ticket)
                table.close(ticket)
                live.remove(ticket)
        assert table.total == len(live) <= total
        for src in {"10.0.0.1", "10.0.0.2", "2001:db8::/64", "?"}:
            waiting = sum(1 for t in live if t.source == src and not t.logged_in)
            assert table.connecting(src) == waiting <= per
        assert table.sources == len({t.source for t in live if not t.logged_in})


def test_logged_in_connections_do_not_count_against_their_address() -> None:
    """Thousands of devices behind one NAT address: only those still logging in count."""
    table = ConnectionTable(ConnLimits(connecting_per_source=2, total=10_000))
    for _ in range(1000):
        ticket = table.open("10.0.0.1")
        assert isinstance(ticket, Ticket)
        table.logged_in(ticket)
    assert table.total == 1000 and table.connecting("10.0.0.1") == 0


@given(st.ip_addresses(v=6))
def test_an_ipv6_host_counts_as_its_slash_64(address: object) -> None:
    """Every address of one /64 is one source; an IPv4-mapped one is its IPv4 address."""
    assert isinstance(address, ipaddress.IPv6Address)
    key = source_of(str(address))
    if address.ipv4_mapped is not None:
        assert key == str(address.ipv4_mapped)
    else:
        assert key.endswith("/64")
        neighbour = ipaddress.IPv6Address(int(address) ^ 0xFFFF_FFFF)
        if neighbour.ipv4_mapped is None:
            assert source_of(str(neighbour)) == key


LOGIN_OPS = st.lists(st.tuples(st.sampled_from(["fail", "ok", "ask"]),
                               st.integers(0, 3), st.integers(0, 3),
                               st.one_of(st.floats(0, 3), st.floats(0, 120))), max_size=150)


@given(failures=st.integers(1, 6), source_failures=st.integers(1, 20), ops=LOGIN_OPS)
@example(failures=1, source_failures=1,  # a success does not start its source's window
         ops=[("ok", 1, 0, 0.0), ("fail", 1, 2, 8.0), ("fail", 1, 1, 52.0)])
@settings(max_examples=200)
def test_a_pair_is_refused_exactly_during_its_backoff(
        failures: int, source_failures: int, ops: list[tuple[str, int, int, float]]) -> None:
    """A model of the rules: a (source, user) with `failures` failed logins or more is
    refused until 1 s x 2^(extra failures) (at most backoff_max_s) after its last failure;
    a success forgets it; a source with `source_failures` in its 60 s window is refused
    except for users that logged in from it; nothing is refused otherwise."""
    limits = LoginLimits(failures=failures, backoff_max_s=30.0,
                         source_failures=source_failures, table_max=1000)
    guard = LoginGuard(limits)
    now = 0.0
    pairs: dict[tuple[str, str], tuple[int, float]] = {}  # failures, last failure
    window: dict[str, tuple[float, int]] = {}
    good: set[tuple[str, str]] = set()
    for op, s, u, step in ops:
        now += step
        source, user = f"10.0.0.{s}", f"van-{u}"
        key = (source, user)
        count, last = pairs.get(key, (0, 0.0))
        if count and now - last >= max(30.0, SOURCE_WINDOW_S):  # forgotten then
            count = 0
        until = last + min(2.0 ** (count - failures), 30.0) if count >= failures else 0.0
        start, fails = window.get(source, (now, 0))
        if now - start >= SOURCE_WINDOW_S:
            start, fails = now, 0
        expect = (now < until) or (fails >= source_failures and key not in good)
        assert (guard.refusal(source, user, now) is not None) == expect, (op, key, now)
        if op == "fail":
            guard.failed(source, user, now)
            pairs[key] = (count + 1, now)
            window[source] = (start, fails + 1)
        elif op == "ok":
            guard.succeeded(source, user, now)
            pairs.pop(key, None)
            good.add(key)
            # A success leaves its source's window as it is: a window starts at a failure
            # (the model once started one here, and disagreed with the guard when a
            # failure followed within 60 s and the question came 60 s after the success).


@given(st.integers(1, 50_000))
@settings(max_examples=5, deadline=None)
def test_memory_stays_bounded_under_distinct_usernames_and_addresses(n: int) -> None:
    """A flood of distinct usernames and addresses, failing and succeeding: each table
    holds at most table_max entries, and after the windows pass nothing is left."""
    guard = LoginGuard(LoginLimits(table_max=500))
    for i in range(n):
        source = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        guard.refusal(source, f"user-{i}", i * 0.001)
        guard.failed(source, f"user-{i}", i * 0.001)
        if i % 7 == 0:
            guard.succeeded(source, f"user-{i}", i * 0.001)
        assert max(guard.sizes()) <= 500
    guard.refusal("10.9.9.9", "x", n * 0.001 + KNOWN_GOOD_S + 1)
    assert guard.sizes() == (0, 0, 0)


def test_a_guesser_does_not_lock_out_the_device_elsewhere_or_a_known_one_nearby() -> None:
    """The documented choice: guessing van-7 from A refuses van-7 from A only; A's spray of
    usernames refuses A, except a user that logged in from A before."""
    guard = LoginGuard(LoginLimits(failures=5, source_failures=20))
    guard.succeeded("10.0.0.1", "van-12", 0.0)
    for i in range(5):
        guard.failed("10.0.0.1", "van-7", 1.0 + i)
    assert guard.refusal("10.0.0.1", "van-7", 5.5) is not None
    assert guard.refusal("10.0.0.2", "van-7", 5.5) is None
    for i in range(20):
        guard.failed("10.0.0.1", f"guess-{i}", 6.0)
    assert guard.refusal("10.0.0.1", "van-99", 7.0) is not None
    assert guard.refusal("10.0.0.1", "van-12", 7.0) is None
    assert guard.refusal("10.0.0.1", "van-99", 1.0 + SOURCE_WINDOW_S + 0.1) is None


def test_the_settings_reach_the_tables_from_the_config_file_model(tmp_path: Path) -> None:
    """BrokerConfig's limits map to BrokerSettings, the two tables and the auth plugin."""
    cfg = BrokerConfig(data_dir=tmp_path, max_connections=900, max_connecting_per_ip=7,
                       login_backoff_after=3, login_backoff_max_s=42.0,
                       login_failures_per_ip=11, login_check_threads=4)
    s = BrokerSettings.from_config(cfg)
    assert s.conn_limits() == ConnLimits(connecting_per_source=7, total=900)
    assert s.login_limits() == LoginLimits(failures=3, backoff_max_s=42.0, source_failures=11)
    plugin = s.amqtt_config()["plugins"]["broker.embedded.plugins.PasswordFileAuthPlugin"]
    assert plugin["check_threads"] == 4
    defaults = BrokerSettings.from_config(BrokerConfig(data_dir=tmp_path))
    assert defaults.conn_limits() == ConnLimits() and defaults.login_limits() == LoginLimits()
    assert defaults.login_check_threads == BrokerConfig().login_check_threads == 1


def test_max_connections_is_lowered_to_the_file_descriptor_limit() -> None:
    """Past the fd limit accept() fails (EMFILE) and asyncio stops accepting anyone for a
    while: the total bound is lowered to leave the broker its own descriptors."""
    assert fitting_total(50_000, fd_limit=1024) == 1024 - FD_RESERVE
    assert fitting_total(500, fd_limit=1024) == 500
    assert fitting_total(50_000, fd_limit=65_536) == 50_000
    assert fitting_total(10, fd_limit=10) == 1


def test_the_default_bound_is_fitted_quietly_and_a_chosen_one_with_a_warning() -> None:
    """A broker started with the defaults under a small fd limit (a shell's 1024, a
    container's 20000) must not greet the operator with a warning at every start."""
    with capture_logs() as quiet:
        fitting_total(MAX_CONNECTIONS, fd_limit=1024)
    with capture_logs() as loud:
        fitting_total(30_000, fd_limit=1024)
    assert [e["log_level"] for e in quiet] == ["info"]
    assert [e["log_level"] for e in loud] == ["warning"]


def test_the_soft_fd_limit_is_lifted_to_the_hard_one() -> None:
    """Run in a child: lowering the soft limit must not touch the test process."""
    code = ("import resource\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "from broker.embedded.conn_guard import raise_fd_limit\n"
            "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    got, soft, hard = out
    assert got == soft, out
    assert soft == hard or int(hard) == resource.RLIM_INFINITY, out
