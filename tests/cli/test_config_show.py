"""`config show`: unset optional keys appear as comments with their defaults; the text
still loads back to the same config; `--json` is one document with every key."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from waystation.cli import main
from waystation.cli.config_text import annotate, unset_comments
from waystation.config import MODELS, AgentConfig, dump_toml, load_config


def _show(capsys: pytest.CaptureFixture[str], *argv: str, env: dict[str, str] | None = None
          ) -> str:
    assert main(["config", "show", *argv], env=env or {}) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize(("part", "keys"), [
    ("server", ["# metrics_port = ", "# schema_file = ", "# url = ", "# [mqtt.tls]",
                "# password_file = ", "# ca_file = "]),
    ("agent", ["# encryption_key_file = ", "# [mqtt.tls]", "# tcp_port = ",
               "# password_file = ", "# schema_file = "]),
    ("broker", ["# tls_port = ", "# [tls]", "# password_file = "]),
])
def test_unset_optional_keys_are_shown_commented(
        capsys: pytest.CaptureFixture[str], part: str, keys: list[str]) -> None:
    out = _show(capsys, part)
    for key in keys:
        assert key in out, key
    assert "(unset by default: no metrics endpoint)" in out or part != "server"


def test_commented_keys_sit_in_their_table(capsys: pytest.CaptureFixture[str]) -> None:
    """encryption_key_file is listed under [storage], where it belongs, before the next table."""
    out = _show(capsys, "agent")
    storage = out.index("[storage]")
    key = out.index("# encryption_key_file = ")
    following = out.find("\n[", storage + 1)
    assert storage < key < following


def test_a_set_key_is_not_commented(capsys: pytest.CaptureFixture[str]) -> None:
    out = _show(capsys, "server", env={"WAYSTATION_SERVER__METRICS_PORT": "9100"})
    assert "\nmetrics_port = 9100\n" in out and "# metrics_port" not in out


@pytest.mark.parametrize("part", ["agent", "server", "broker"])
def test_shown_text_loads_back_to_the_same_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str) -> None:
    text = _show(capsys, part)
    path = tmp_path / f"{part}.toml"
    path.write_text(text, encoding="utf-8")
    model = MODELS[part]
    load_config(model, path, {})  # valid as a config file (relative paths move with it)
    assert tomllib.loads(text) == tomllib.loads(dump_toml(load_config(model, None, {})))


def test_json_is_one_document_with_every_key_and_masked_secrets(
        capsys: pytest.CaptureFixture[str]) -> None:
    env = {"WAYSTATION_SERVER__MQTT__PASSWORD": "hunter2-secret",
           "WAYSTATION_SERVER__STORE__URL": "postgresql://u:pw-secret@db/x",
           "WAYSTATION_SERVER__STORE__KIND": "postgres"}
    out = _show(capsys, "server", "--json", env=env)
    assert "hunter2-secret" not in out and "pw-secret" not in out
    doc = json.loads(out)
    assert doc["part"] == "server" and doc["file"] is None
    assert doc["config"]["metrics_port"] is None
    assert doc["config"]["mqtt"]["tls"] is None
    assert doc["config"]["store"]["kind"] == "postgres"
    assert set(doc["env_overrides"]) == set(env)


_OPTIONAL_AGENT = {
    "schema_file": st.just("fleet.toml"),
    "storage": st.fixed_dictionaries({"encryption_key_file": st.just("key.bin")}),
    "api": st.fixed_dictionaries({"tcp_port": st.integers(1024, 65535)}),
    "mqtt": st.fixed_dictionaries({"username": st.from_regex(r"[a-z]{1,8}", fullmatch=True)}),
}


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(_OPTIONAL_AGENT)), st.none(), max_size=4)
       .flatmap(lambda chosen: st.fixed_dictionaries(
           {k: _OPTIONAL_AGENT[k] for k in chosen})))
def test_annotated_text_round_trips_and_comments_exactly_the_unset_keys(
        data: dict[str, object]) -> None:
    """Whatever optional keys are set, the annotated TOML parses to the same document as
    the plain dump, and a key is commented exactly when it is unset."""
    config = AgentConfig.model_validate({"device_id": "van-1", **data})
    plain = dump_toml(config)
    text = annotate(plain, unset_comments(config))
    assert tomllib.loads(text) == tomllib.loads(plain)
    for section, key in (((), "schema_file"), (("storage",), "encryption_key_file"),
                         (("api",), "tcp_port"), (("mqtt",), "username")):
        node: object = config
        for part in section:
            node = getattr(node, part)
        commented = f"# {key} = " in text
        assert commented == (getattr(node, key) is None), (key, text)
