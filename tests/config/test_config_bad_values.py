"""Wrong values for the broker's queue and CONNECT limits, the agent's deaf check and the
server's nudge grace, in a TOML file, an environment override or `python -m
broker.embedded`'s options: one error naming the setting and its whole allowed range,
exit code 2 (ConfigError), as every config error."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from broker.embedded.settings import BrokerSettings
from waystation.cli import main
from waystation.config import AgentConfig, BrokerConfig, ServerConfig, load_config
from waystation.errors import ConfigError

# (model, part, table, key, the allowed range as the error must say it)
SETTINGS = [
    (BrokerConfig, "broker", None, "max_queued_messages",
     "must be a whole number from 100 to 10000000"),
    (BrokerConfig, "broker", None, "max_queued_mb", "must be a whole number of MB from 1 to 65536"),
    (BrokerConfig, "broker", None, "connect_timeout_s",
     "must be a number of seconds greater than 0 and at most 3600"),
    (BrokerConfig, "broker", None, "max_connections", "must be a whole number from 1 to 1000000"),
    (BrokerConfig, "broker", None, "max_connecting_per_ip",
     "must be a whole number from 1 to 1000000"),
    (BrokerConfig, "broker", None, "login_backoff_after", "must be a whole number from 1 to 1000"),
    (BrokerConfig, "broker", None, "login_backoff_max_s",
     "must be a number of seconds greater than 0 and at most 86400"),
    (BrokerConfig, "broker", None, "login_failures_per_ip",
     "must be a whole number from 1 to 1000000"),
    (BrokerConfig, "broker", None, "login_check_threads",
     "must be a whole number from 1 to 64"),
    (AgentConfig, "agent", "sync", "deaf_after_s",
     "must be a number of seconds from 1 to 3600"),
    (ServerConfig, "server", "merge", "missed_grace_ms",
     "must be a whole number from 1000 to 3600000"),
]
# (TOML value, as shown in the error; None: the same)
WRONG = [("0", None), ("-5", None), ('"soon"', None), ("1e30", "1e+30"),
         ("99999999999999999999", None), ("nan", None), ("true", None)]
CASES = [pytest.param(model, part, table, key, allowed, value, shown or value,
                      id=f"{key}={value}")
         for model, part, table, key, allowed in SETTINGS for value, shown in WRONG]


def _toml(table: str | None, key: str, value: str) -> str:
    return f"[{table}]\n{key} = {value}\n" if table else f"{key} = {value}\n"


@pytest.mark.parametrize(("model", "part", "table", "key", "allowed", "value", "shown"), CASES)
def test_a_wrong_value_in_the_file_names_the_setting_and_range(
        tmp_path: Path, model: type, part: str, table: str | None, key: str, allowed: str,
        value: str, shown: str) -> None:
    """0, negative, text, huge, NaN or a boolean in the TOML file: the file, the dotted key,
    the allowed range and what was read."""
    conf = tmp_path / f"{part}.toml"
    conf.write_text(_toml(table, key, value), encoding="utf-8")
    dotted = f"{table}.{key}" if table else key
    with pytest.raises(ConfigError) as info:
        load_config(model, conf, {})
    assert str(info.value) == f"{conf}: {dotted}: {allowed} (got {shown})"
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("model", "part", "table", "key", "allowed", "value", "shown"), CASES)
def test_a_wrong_environment_override_names_the_variable_and_range(
        model: type, part: str, table: str | None, key: str, allowed: str, value: str,
        shown: str) -> None:
    """The same values from WAYSTATION_<PART>__...: the variable instead of the file."""
    var = "__".join(["WAYSTATION_" + part.upper(), *([table.upper()] if table else []),
                     key.upper()])
    dotted = f"{table}.{key}" if table else key
    with pytest.raises(ConfigError) as info:
        load_config(model, None, {var: value.strip('"')})
    assert str(info.value).startswith(f"{var}: {dotted}: {allowed} (got ")


@pytest.mark.parametrize(("key", "value"), [("connect_timeout_s", '"15"'),
                                            ("connect_timeout_s", "true")])
def test_connect_timeout_is_a_number_not_text_or_a_boolean(tmp_path: Path, key: str,
                                                           value: str) -> None:
    """connect_timeout_s = true was read as 1 s and "15" as 15 s; both are refused now, as
    for every other number setting."""
    conf = tmp_path / "broker.toml"
    conf.write_text(_toml(None, key, value), encoding="utf-8")
    with pytest.raises(ConfigError, match=r": connect_timeout_s: must be a number of "):
        load_config(BrokerConfig, conf, {})


def test_values_in_range_still_load(tmp_path: Path) -> None:
    """The bounds themselves and values between them are accepted."""
    conf = tmp_path / "broker.toml"
    conf.write_text("max_queued_messages = 100\nmax_queued_mb = 65536\n"
                    "connect_timeout_s = 0.5\n", encoding="utf-8")
    cfg = load_config(BrokerConfig, conf, {"WAYSTATION_BROKER__CONNECT_TIMEOUT_S": "3600"})
    assert (cfg.max_queued_messages, cfg.max_queued_mb, cfg.connect_timeout_s) == \
        (100, 65536, 3600.0)
    agent = load_config(AgentConfig, None, {"WAYSTATION_AGENT__SYNC__DEAF_AFTER_S": "1"})
    assert agent.sync.deaf_after_s == 1.0


@pytest.mark.parametrize(("argv", "part", "words"), [
    (["broker", "run"], "broker", "max_queued_mb: must be a whole number of MB from 1 to 65536 "
                                  "(got 0)"),
    (["agent", "run"], "agent", "sync.deaf_after_s: must be a number of seconds from 1 to "
                                "3600 (got -5)"),
])
def test_run_commands_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], part: str, words: str) -> None:
    """`waystation broker run` / `agent run` with such a file: one error line, exit 2, before
    anything starts."""
    conf = tmp_path / f"{part}.toml"
    conf.write_text("max_queued_mb = 0\n" if part == "broker" else "[sync]\ndeaf_after_s = -5\n",
                    encoding="utf-8")
    assert main([*argv, "--config", str(conf)], env={}) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {conf}: {words}\n"


# ------------------------------------------------------- python -m broker.embedded

def _options(**given: object) -> argparse.Namespace:
    options: dict[str, object] = {"max_queued_messages": None, "max_queued_mb": None,
                                  "connect_timeout_s": None, "max_connections": None,
                                  "max_connecting_per_ip": None, "login_backoff_after": None,
                                  "login_backoff_max_s": None, "login_failures_per_ip": None,
                                  "login_check_threads": None}
    return argparse.Namespace(**{**options, **given})


@pytest.mark.parametrize(("given", "words"), [
    ({"max_queued_messages": 0}, "max_queued_messages (--max-queued-messages) must be a whole "
                                 "number from 1 to 10000000 (got 0)"),
    ({"max_queued_messages": -5}, "from 1 to 10000000 (got -5)"),
    ({"max_queued_messages": 10**12}, "from 1 to 10000000 (got 1000000000000)"),
    ({"max_queued_mb": 0}, "max_queued_mb (--max-queued-mb) must be a whole number of MB "
                           "from 1 to 65536 (got 0)"),
    ({"max_queued_mb": -1}, "from 1 to 65536 (got -1)"),
    ({"max_queued_mb": 70_000}, "from 1 to 65536 (got 70000)"),
    ({"connect_timeout_s": 0.0}, "connect_timeout_s (--connect-timeout-s) must be a number of "
                                 "seconds greater than 0 and at most 3600 (got 0.0)"),
    ({"connect_timeout_s": -3.0}, "at most 3600 (got -3.0)"),
    ({"connect_timeout_s": float("nan")}, "at most 3600 (got nan)"),
    ({"connect_timeout_s": 1e9}, "at most 3600 (got 1000000000.0)"),
    ({"max_connections": 0}, "max_connections (--max-connections) must be a whole number "
                             "from 1 to 1000000 (got 0)"),
    ({"max_connecting_per_ip": -1}, "max_connecting_per_ip (--max-connecting-per-ip) must be "
                                    "a whole number from 1 to 1000000 (got -1)"),
    ({"login_backoff_after": 0}, "login_backoff_after (--login-backoff-after) must be a whole "
                                 "number from 1 to 1000 (got 0)"),
    ({"login_backoff_max_s": 0.0}, "login_backoff_max_s (--login-backoff-max-s) must be a "
                                   "number of seconds greater than 0 and at most 86400 (got "
                                   "0.0)"),
    ({"login_backoff_max_s": float("nan")}, "at most 86400 (got nan)"),
    ({"login_failures_per_ip": 10**7}, "login_failures_per_ip (--login-failures-per-ip) must "
                                       "be a whole number from 1 to 1000000 (got 10000000)"),
    ({"login_check_threads": 65}, "login_check_threads (--login-check-threads) must "
                                     "be a whole number from 1 to 64 (got 65)"),
])
def test_broker_options_out_of_range_are_refused(given: dict[str, object], words: str) -> None:
    """The command line's values: 0 was taken as "not given" (the default, silently), and a
    negative queue limit started a broker that dropped every message. (The command line
    takes fewer than a config file's 100 queued messages, for tests.)"""
    with pytest.raises(ConfigError) as info:
        BrokerSettings.from_config(_options(**given))
    assert words in str(info.value)


def test_python_m_broker_embedded_exits_2_on_a_bad_option(tmp_path: Path) -> None:
    """`python -m broker.embedded --max-queued-messages -5`: one error line, exit 2, no
    broker (it started one that dropped everything)."""
    proc = subprocess.run(
        [sys.executable, "-m", "broker.embedded", "--host", "127.0.0.1", "--port", "1",
         "--data-dir", str(tmp_path / "data"), "--password-file", str(tmp_path / "passwd"),
         "--max-queued-messages", "-5"],
        capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: broker: max_queued_messages (--max-queued-messages) must be a whole number "
        "from 1 to 10000000 (got -5)")
