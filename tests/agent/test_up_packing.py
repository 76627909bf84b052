"""How the agent compresses what it sends (agent.up_packing): nothing before a welcome;
zd1, zd2, zd3 as agreed; the references survive a reconnect to the same schema, are
forgotten when the server does not hold them, and zd3 stops after three refusals on one
connection; a `malformed` answer drops zd2 and zd3."""

from __future__ import annotations

import zlib

from agent.up_packing import MAX_MISSES, UpPacking
from schemas import zdict, zdict_schema
from schemas.collection import example_catalog_path, load_catalog
from schemas.zdict_recent import DeviceRefs

CATALOG = load_catalog(example_catalog_path())
BASE = zdict_schema.dictionary(CATALOG)
ALL = frozenset({"zd1", "zd2", "zd3"})


def _msg(n: int) -> bytes:
    return (b'{"type":"changes","v":1,"dev":"van-1","sv":1,"ch":[{"n":%d,"c":"tasks",'
            b'"k":"t-%d","f":{"notes":"leave at the door, call first"}}]}' % (n, n))


def _agreed(caps: frozenset[str] = ALL) -> UpPacking:
    packing = UpPacking()
    packing.hello_zd(CATALOG)
    packing.welcome(caps)
    return packing


def _uses_refs(packing: UpPacking, n: int) -> bool:
    ident = zdict.wants_dictionary(packing.changes(n, _msg(n), None))
    return ident not in (None, zdict.DICT_ID, zdict_schema.dict_id(BASE))


def test_nothing_is_compressed_with_a_dictionary_before_a_welcome() -> None:
    packing = UpPacking()
    packing.hello_zd(CATALOG)
    assert packing.packing() is False
    assert packing.changes(1, _msg(1), None) == _msg(1)


def test_each_capability_as_agreed() -> None:
    assert _agreed(frozenset({"zd1"})).packing() is True
    assert _agreed(frozenset({"zd1", "zd2"})).packing() == BASE
    assert not _agreed(frozenset({"zd1", "zd2"})).recent_in_use
    assert not _agreed(frozenset({"zd1", "zd3"})).recent_in_use  # zd3 needs zd2
    assert _agreed().recent_in_use


def test_references_after_an_answer_and_across_a_reconnect() -> None:
    packing = _agreed()
    assert not _uses_refs(packing, 1)  # nothing answered yet: zd2
    packing.answered([1])
    assert _uses_refs(packing, 2)
    packing.answered([2])
    packing.welcome(None)  # disconnected
    # nothing but v1 until the next welcome agrees again (a new server may not speak it)
    assert packing.changes(3, _msg(3), None) == _msg(3)
    packing.welcome(ALL)  # the same schema: the server keeps them too
    packing.answered([3])  # sent plain, a reference all the same (the server keeps it)
    stream = packing.changes(4, _msg(4), None)
    wanted = zdict.wants_dictionary(stream)
    assert wanted == zlib.adler32(BASE + _msg(1) + _msg(2) + _msg(3))


def test_unknown_references_reset_and_three_refusals_stop_zd3() -> None:
    packing = _agreed()
    for attempt in range(MAX_MISSES):
        packing.changes(10 * attempt + 1, _msg(1), None)
        packing.answered([10 * attempt + 1])
        assert _uses_refs(packing, 10 * attempt + 2)
        assert packing.dictionary_unknown()
        assert not _uses_refs(packing, 10 * attempt + 3)  # back to zd2
    assert not packing.recent_in_use
    assert not packing.dictionary_unknown()
    packing.welcome(ALL)  # a new connection tries again
    assert packing.recent_in_use


def test_malformed_drops_zd2_and_zd3() -> None:
    packing = _agreed()
    assert packing.malformed()
    assert packing.packing() is True and not packing.recent_in_use


def test_device_refs_follow_the_base() -> None:
    refs = DeviceRefs(BASE)
    refs.sent(1, _msg(1))
    refs.answered([1])
    assert refs.dictionary() == BASE + _msg(1)
