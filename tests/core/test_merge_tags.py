"""Set add-tags of re-created stores (`waystation.merge.tags`): of the §2 form, apart
from every tag of an earlier store, and a device's own change ids stand for them."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from waystation.merge.tags import TAG_SPAN, add_tag, seen_tags, tag_base, tag_change

TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:[1-9][0-9]{0,15}$")
"""The tag pattern of schemas/json/rec.json and change.json (what v1 devices check)."""
incs = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-",
               min_size=8, max_size=32)
numbers = st.integers(1, 2**53 - 1)
devs = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@given(devs, numbers, incs)
def test_a_tag_is_of_the_form_devices_read(dev: str, n: int, inc: str) -> None:
    for base in (0, tag_base(inc)):
        tag = add_tag(dev, n, base)
        assert TAG.fullmatch(tag) and int(tag.rpartition(":")[2]) < 2**53
        assert tag_change(tag) == (dev, n % TAG_SPAN)


@given(devs, st.integers(1, TAG_SPAN - 1), st.integers(1, TAG_SPAN - 1), incs)
def test_a_re_created_store_never_takes_a_first_store_s_tag(
        dev: str, n: int, m: int, inc: str) -> None:
    base = tag_base(inc)
    assert base % TAG_SPAN == 0 and base > 0
    assert add_tag(dev, n, base) != add_tag(dev, m, 0)
    assert add_tag(dev, n, 0) == f"{dev}:{n}"  # a first store: its change ids


@given(devs, st.integers(1, TAG_SPAN - 1), incs)
def test_own_change_ids_stand_for_the_tagged_form(dev: str, n: int, inc: str) -> None:
    base = tag_base(inc)
    named = [f"{dev}:{n}", f"other-{dev}:{n}", f"{dev}x:{n}"]
    seen = seen_tags(dev, named, base)
    assert set(seen) == {*named, add_tag(dev, n, base)}
    assert seen_tags(dev, named, 0) == named


def test_stores_of_one_device_are_tagged_apart() -> None:
    """2^21 - 2 bases: two stores of one device share one with odds of about 1 in 2
    million (and then only an add of the same member to the same record under the same
    change number meets the old tag)."""
    bases = [tag_base(f"incarnation{i:06d}") for i in range(50)]
    assert len(set(bases)) == 50
    assert max(bases) + TAG_SPAN <= 2**53
