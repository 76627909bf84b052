"""The server's stored records carried across a published version and back
(broker.server.schema_records.rewrite_fields; the store loop: test_engine_schema_push)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.server.schema_records import rewrite_fields
from schemas.wire import MAX_SAFE_INT
from tests.schemas.test_migrate import chain
from waystation.hlc import Stamp
from waystation.merge.state import Counter, FieldState, Register, Version

NAMES = ("route", "eta", "notes", "name")
stamps = st.builds(Stamp, st.integers(0, 2**40), st.integers(0, 65535), st.just("van-1"))


@st.composite
def records(draw: st.DrawFn) -> dict[str, FieldState]:
    """A version-1 record's field states (registers; strings, and eta an int)."""
    out: dict[str, FieldState] = {}
    for name in draw(st.sets(st.sampled_from(NAMES))):
        value = draw(st.integers(-MAX_SAFE_INT, MAX_SAFE_INT) if name == "eta"
                     else st.text(max_size=12) | st.none())
        out[name] = Register(Version(value, draw(stamps), "van-1", draw(st.integers(1, 99))),
                             draw(st.integers(1, 10**6)))
    return out


def test_version_1_record_goes_up_to_version_3() -> None:
    _, steps, _ = chain()
    h = Stamp(5, 0, "van-1")
    fields: dict[str, FieldState] = {
        "notes": Register(Version("n", h, "van-1", 1), 3),
        "eta": Register(Version(17, h, "van-1", 1), 3),
        "name": Register(Version("Ada King", h, "van-1", 2), 4),
        "tries": Counter(3, 2)}
    out = rewrite_fields(fields, "tasks", steps, up=True)
    assert {k: v.value.v for k, v in out.items() if isinstance(v, Register)} == {
        "note": "n", "eta": "17", "first": "Ada", "last": "King"}
    assert out["first"].q == 4 and out["tries"] == Counter(3, 2)  # counters: renamed only


@settings(max_examples=100, deadline=None)
@given(records())
def test_property_rollback_undoes_publish(fields: dict[str, FieldState]) -> None:
    """Up along the steps then back down gives the stored fields back."""
    _, steps, _ = chain()
    up = rewrite_fields(fields, "tasks", steps, up=True)
    assert rewrite_fields(up, "tasks", steps, up=False) == fields


def test_unconvertible_value_is_dropped_going_down() -> None:
    _, steps, _ = chain(2)
    h = Stamp(5, 0, "van-1")
    fields: dict[str, FieldState] = {"eta": Register(Version("soon", h, "van-1", 1), 3)}
    assert rewrite_fields(fields, "tasks", steps, up=False) == {}
