"""Fetch by query for a device on an older schema version (PROTOCOL.md §7.14.1, §11):
the filter is evaluated on the server's schema, and the records come back projected
down to the device's version like every other record state; on both stores."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.server.conftest import StoreFactory
from tests.server.helpers import by_device, changes, hello, of_type, oks, status, task
from tests.server.test_engine_upcast import published


def test_old_device_gets_fetched_records_in_its_version(store_factory: StoreFactory,
                                                        tmp_path: Path) -> None:
    engine, _, _ = published(store_factory, tmp_path)
    for dev, sv in (("van-1", 1), ("van-2", 4)):
        engine.handle_status(dev, status(dev))
        engine.handle_up(dev, hello(dev, sv=sv))
    out = by_device(engine.handle_up("van-2", changes("van-2", [
        task(1, "t-1", note="gate code 12", eta="1764000000001", floor=3)], sv=4)))
    assert oks(out["van-2"]) == [[1, "r1", 1]]

    def ask(where: dict[str, object]) -> dict[str, object]:
        req = orjson.dumps({"type": "fetchq", "v": 1, "dev": "van-1", "req": "q-1",
                            "c": "tasks", "w": where})
        (answer,) = of_type(by_device(engine.handle_up("van-1", req))["van-1"], "fetchedq")
        return answer

    answer = ask({"note": {"prefix": "gate"}})  # the server's (v4) field names
    (rec,) = answer["recs"]  # type: ignore[misc]
    # van-1 runs version 1: `notes`, `eta` as an int, and no `floor` (added in v2).
    assert rec["f"] == {"route": "r1", "notes": "gate code 12", "eta": 1764000000001}
    # A field only the device's older version has is unknown to the server.
    err = ask({"notes": {"prefix": "gate"}})["err"]
    assert err["code"] == "unknown_field"  # type: ignore[index]
