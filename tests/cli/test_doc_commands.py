"""Every `waystation ...` command the README, the operator guide and the docs show is
one the CLI has, with options it accepts: a newcomer follows them word for word."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from waystation.cli.parser import build_parser, command_paths, leaf_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "deploy" / "README.md",
        *sorted((REPO / "docs").glob("*.md"))]
# `waystation` as a command word: at a line's or code span's start, after a path, a
# `runuser ... --`, `sudo`, `$`, or `;`/`&&`.
_COMMAND = re.compile(r"(?:^|(?<=[`\s/;&$(]))waystation(?=\s)")
_END = re.compile(r"[`|;&)#]")


def doc_commands() -> list[tuple[str, int, list[str]]]:
    """(doc, line, words after `waystation`) for every command shown in code."""
    found = []
    for doc in DOCS:
        in_block = False
        for no, line in enumerate(doc.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                in_block = not in_block
                continue
            spans = [line] if in_block else re.findall(r"`([^`]+)`", line)
            for span in spans:
                for m in _COMMAND.finditer(span):
                    rest = span[m.end():]
                    words = rest[:_END.search(rest).start() if _END.search(rest) else None].split()
                    if words and re.fullmatch(r"[a-z][a-z-]*", words[0]):
                        found.append((doc.relative_to(REPO).as_posix(), no, words))
    return found


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {opt for action in parser._actions for opt in action.option_strings}


def test_the_docs_show_commands_at_all() -> None:
    """The scan finds what it is meant to check (a regex gone blind passes vacuously)."""
    shown = {" ".join(w[:2]) for _, _, w in doc_commands()}
    assert {"server status", "agent status", "device add", "broker run"} <= shown


@pytest.mark.parametrize("doc", [d.relative_to(REPO).as_posix() for d in DOCS])
def test_every_command_and_option_the_docs_show_exists(doc: str) -> None:
    parser = build_parser()
    paths = {" ".join(p) for p in command_paths(parser)}
    top = {p.split()[0] for p in paths}
    wrong = []
    for where, no, words in doc_commands():
        if where != doc or words[0] not in top | {"--help", "--version"}:
            continue  # prose ("waystation syncs ...") or the top-level flags
        path = words[0]
        for word in words[1:]:
            if f"{path} {word}" not in paths:
                break
            path = f"{path} {word}"
        if path not in paths:
            continue
        leaf = leaf_parser(parser, path)
        has_sub = any(isinstance(a, argparse._SubParsersAction) for a in leaf._actions)
        rest = words[len(path.split()):]
        if has_sub and rest and not rest[0].startswith("-") and rest[0] not in {"...", "…"}:
            # `[list]` (optional), `disable/enable/remove` (a table's shorthand)
            names = rest[0].strip("[]").split("/")
            missing = [n for n in names if f"{path} {n}" not in paths]
            if missing:
                wrong.append(f"{where}:{no}: `waystation {path} {rest[0]}`: no such "
                             f"command {', '.join(missing)}")
            continue
        known = _options(leaf)
        for word in rest:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--[a-z][a-z0-9-]*", flag) and flag not in known:
                wrong.append(f"{where}:{no}: `waystation {path}` has no option {flag}")
    assert not wrong, "\n".join(wrong)


def toml_blocks() -> list[tuple[str, int, str]]:
    """(doc, line, text) of every ```toml block of the docs."""
    out = []
    for doc in DOCS:
        lines = doc.read_text().splitlines()
        start = None
        for no, line in enumerate(lines, 1):
            if line.strip() == "```toml":
                start = no
            elif line.strip() == "```" and start is not None:
                out.append((doc.relative_to(REPO).as_posix(), start,
                            "\n".join(lines[start:no - 1])))
                start = None
    return out


@pytest.mark.parametrize("where,line,text", toml_blocks(),
                         ids=[f"{d}:{n}" for d, n, _ in toml_blocks()])
def test_every_toml_example_is_a_config_or_schema_the_code_accepts(
        where: str, line: int, text: str) -> None:
    """A config example is accepted by the model of the part it configures (an unknown
    or misspelt key is refused: the models forbid extras); a whole schema example loads
    as a schema. Fragments of a schema (one collection) are left to the schema docs."""
    import tomllib

    from pydantic import ValidationError

    from schemas.collection import parse_catalog
    from waystation.config import AgentConfig, BrokerConfig, ServerConfig

    data = tomllib.loads(text.replace("${CREDENTIALS_DIRECTORY}", "/run/credentials"))
    if "collections" in data or "migrations" in data:
        if "version" in data and "migrations" not in data:
            parse_catalog(data, f"{where}:{line}")
        return
    errors = []
    for model in (AgentConfig, ServerConfig, BrokerConfig):
        try:
            model.model_validate(data)
            return
        except ValidationError as exc:
            errors.append(f"{model.__name__}: {exc}")
    pytest.fail(f"{where}:{line}: no part's config accepts this example:\n" + "\n".join(errors))


def test_every_environment_override_the_docs_name_is_a_setting() -> None:
    """`WAYSTATION_<PART>__<KEY>__<SUBKEY>` names in the docs lead to a real setting."""
    from pydantic import BaseModel

    from waystation.config import AgentConfig, BrokerConfig, ServerConfig

    parts: dict[str, type[BaseModel]] = {"AGENT": AgentConfig, "SERVER": ServerConfig,
                                         "BROKER": BrokerConfig}
    names = {m for doc in DOCS
             for m in re.findall(r"WAYSTATION_([A-Z]+)__([A-Z0-9_]+)", doc.read_text())}
    assert names, "the docs name no override: the scan is blind"
    wrong = []
    for part, path in sorted(names):
        model: type[BaseModel] | None = parts.get(part)
        for key in path.lower().split("__"):
            field = None if model is None else model.model_fields.get(key)
            if field is None:
                wrong.append(f"WAYSTATION_{part}__{path}")
                break
            nested = field.annotation
            model = nested if isinstance(nested, type) and issubclass(nested, BaseModel) \
                else None
    assert not wrong, wrong


def _code_spans(doc: Path) -> list[tuple[int, str]]:
    """(line, text) of every code-block line and inline code span of a doc."""
    out, in_block = [], False
    for no, line in enumerate(doc.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        out.extend((no, span) for span in ([line] if in_block
                                           else re.findall(r"`([^`]+)`", line)))
    return out


def test_every_curl_the_docs_show_is_silent() -> None:
    """A `curl` without -s prints its progress meter into what the docs show as the
    answer (the live-query example of docs/agent-api.md streamed it between events)."""
    wrong = []
    for doc in DOCS:
        for no, text in _code_spans(doc):
            for m in re.finditer(r"(?:^|[\s;&|(])curl\s+((?:-[^\s]*\s+)*)", text):
                flags = m.group(1).split()
                if not any(f == "--silent" or re.fullmatch(r"-[a-zA-Z]*s[a-zA-Z]*", f)
                           for f in flags):
                    wrong.append(f"{doc.relative_to(REPO)}:{no}: {text.strip()}")
    assert not wrong, "\n".join(wrong)


def test_every_python_module_the_docs_run_exists() -> None:
    """`python -m MODULE` in the docs names a module the install (or the checkout, for
    bench/ and tests/) has: the damaged-store section runs `python -m lmdb dump`."""
    import importlib.util
    import sys

    modules = {m for doc in DOCS for _, text in _code_spans(doc)
               for m in re.findall(r"python3? -m ?([a-zA-Z_][\w.]*)", text)}
    assert {"lmdb", "broker.rabbitmq.definitions"} <= modules, modules  # not blind
    sys.path.insert(0, str(REPO))
    try:
        missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    finally:
        sys.path.remove(str(REPO))
    assert not missing, missing


def test_the_readme_names_every_exit_code() -> None:
    """The README's one-paragraph list of exit codes names each code `waystation --help`
    and the guide's table give (it left out 6, the damaged device store)."""
    from waystation.cli.exitcodes import EXIT_CODES

    text = " ".join((REPO / "README.md").read_text().split())
    start = text.index("Exit codes (also in `waystation --help`)")
    sentence = text[start:text.index('"Exit codes"', start)]
    named = {int(n) for n in re.findall(r"(?:^|[\s,:])(\d+) [a-z]", sentence)}
    assert {code for code, _ in EXIT_CODES} <= named, sorted(named)
    guide = (REPO / "deploy" / "README.md").read_text()
    assert all(f"\n| {code} |" in guide for code, _ in EXIT_CODES)
