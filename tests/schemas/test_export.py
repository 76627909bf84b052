"""schemas.export: the committed JSON Schemas match the models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.export import JSON_DIR, main, models, render, stale, write
from schemas.wire import ALL_TYPES

FIX = "run `python -m schemas.export` and commit schemas/json/"


def test_committed_schemas_are_up_to_date() -> None:
    """schemas/json/*.json equal what `python -m schemas.export` would write now."""
    outdated = stale(JSON_DIR)
    assert not outdated, f"stale JSON Schema files {outdated}: {FIX}"


def test_one_schema_per_message_type_plus_rec_and_change() -> None:
    """Exactly one file per wire message type, plus rec.json and change.json."""
    expected = {f"{name}.json" for name in ALL_TYPES} | {"rec.json", "change.json"}
    assert set(render()) == expected
    assert set(models()) == {name.removesuffix(".json") for name in expected}


def test_render_is_stable_and_pretty() -> None:
    """Rendering twice gives identical text: indented, keys sorted, one trailing newline."""
    first, second = render(), render()
    assert first == second
    for name, text in first.items():
        assert text.endswith("}\n") and not text.endswith("\n\n"), name
        doc = json.loads(text)
        assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_message_schemas_require_type_and_v() -> None:
    """Message schemas list `type` and `v` as required and pin `type` to its name."""
    for name in ALL_TYPES:
        schema = json.loads(render()[f"{name}.json"])
        assert {"type", "v"} <= set(schema["required"]), name
        assert schema["properties"]["type"]["const"] == name
        assert schema["properties"]["v"]["const"] == 1


def test_page_schema_uses_wire_name_from() -> None:
    """The page schema names the member `from`, as on the wire (not `from_`)."""
    schema = json.loads(render()["page.json"])
    assert "from" in schema["properties"] and "from_" not in schema["properties"]


def test_check_and_write_cycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--check fails listing missing, changed and extra files; a write makes it pass."""
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert "hello.json" in capsys.readouterr().err
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "hello.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "obsolete.json").write_text("{}\n", encoding="utf-8")
    assert stale(tmp_path) == ["hello.json", "obsolete.json"]
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "hello.json" in err and "obsolete.json" in err and "python -m schemas.export" in err
    assert write(tmp_path) == ["hello.json", "obsolete.json"]
    assert not (tmp_path / "obsolete.json").exists()
    assert stale(tmp_path) == []
    assert write(tmp_path) == []
