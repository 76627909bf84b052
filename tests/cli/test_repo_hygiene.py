"""The repository a newcomer clones: no stray logs, an install step that does not copy
the checkout's venv, docs that exist and agree with the code's exit codes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from waystation.cli.exitcodes import EXIT_CODES

ROOT = Path(__file__).resolve().parents[2]


def _tracked() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.splitlines()


def test_no_log_files_are_tracked() -> None:
    assert [p for p in _tracked() if p.endswith(".log")] == []


def test_install_step_copies_no_venv() -> None:
    guide = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    assert "cp -r ./." not in guide
    assert "git archive HEAD | tar -x -C /opt/waystation" in guide
    assert "--exclude .venv" in guide


def test_readme_points_at_docs_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "design notes the project was started from" not in readme
    for link in re.findall(r"\]\(((?:docs|deploy)/[^)#]+)\)", readme):
        assert (ROOT / link).exists(), link
    assert "docs/ARCHITECTURE.md" in readme


def test_operator_guide_lists_the_exit_codes_the_code_uses() -> None:
    guide = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    section = guide.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    listed = [int(c) for c in re.findall(r"^\| (\d+) \|", section, flags=re.M)]
    assert listed == [code for code, _ in EXIT_CODES]
