"""`waystation broker passwd --stdin` as a real process: the password is read from a pipe,
the entry lands in the password file the broker's config names (or `--password-file`).

The end-to-end fleet (tests/e2e/fleet.py) makes its server's login with this command in
its own process (`waystation.cli.main`); this is where it runs as the operator runs it.
"""

from __future__ import annotations

from pathlib import Path

from broker.embedded.passwords import read_password_file, verify_password
from tests.cli.procs import clean_env, run_cli


def test_stdin_password_through_config_and_password_file(tmp_path: Path) -> None:
    passwd = tmp_path / "broker" / "passwd"
    config = tmp_path / "broker.toml"
    config.write_text(f'host = "127.0.0.1"\nport = 1883\npassword_file = "{passwd}"\n')
    env = clean_env()

    first = run_cli(tmp_path, env, "broker", "passwd", "--config", str(config), "--stdin",
                    "waystation-server", stdin="server-password-1\n")
    assert first.returncode == 0, first.stderr
    assert "login waystation-server written to" in first.stdout
    assert "password:" not in first.stdout  # read, not generated: never echoed

    second = run_cli(tmp_path, env, "broker", "passwd", "--password-file", str(passwd),
                     "--stdin", "van-1", stdin="van-password-1\r\n")
    assert second.returncode == 0, second.stderr

    entries = read_password_file(passwd)
    assert set(entries) == {"waystation-server", "van-1"}
    assert verify_password(entries["waystation-server"], "server-password-1")
    assert verify_password(entries["van-1"], "van-password-1")  # the \r\n is not kept
    assert not verify_password(entries["van-1"], "van-password-1\r")


def test_short_stdin_password_is_refused_in_one_line(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    result = run_cli(tmp_path, clean_env(), "broker", "passwd", "--password-file", str(passwd),
                     "--stdin", "van-1", stdin="short\n")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: the password read from standard input is shorter than 8 characters"]
    assert not passwd.exists() or "van-1" not in read_password_file(passwd)
