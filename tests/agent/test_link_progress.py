"""agent.link_progress: what counts as the link delivering, and how far it draws out a
wait for an answer."""

from __future__ import annotations

from agent.link_progress import PROGRESS_BYTES, LinkProgress


def test_pings_are_not_progress_but_a_message_arriving_is() -> None:
    p = LinkProgress()
    for t in range(1, 10):  # a PINGRESP of 2 bytes per keepalive: a deaf link
        p.observe(30.0 * t, 2 * t)
    assert p.stretched(100.0, 900.0) == 100.0
    p.observe(301.0, 18 + PROGRESS_BYTES)  # part of a page came in
    assert p.stretched(100.0, 900.0) == 301.0


def test_the_wait_is_drawn_out_at_most_by_the_limit() -> None:
    p = LinkProgress()
    for t in range(1, 200):  # other messages never stop coming
        p.observe(float(t), t * PROGRESS_BYTES)
    assert p.stretched(10.0, 160.0) == 170.0
    assert p.stretched(150.0, 160.0) == 199.0


def test_a_new_link_counts_from_zero() -> None:
    p = LinkProgress()
    p.observe(1.0, 50 * PROGRESS_BYTES)
    p.observe(2.0, 10)  # the daemon made a new link (go_online): its counter restarts
    p.observe(3.0, 10 + PROGRESS_BYTES)
    assert p.at == 3.0
