"""Business rules: the operator's hook into the server's merge (PROTOCOL.md §5).

A rule is a plain function `rule(ctx: RuleContext) -> RuleDecision | None`. It runs on
every valid change before the change is committed and sees the change, the device, the
collection schema, the record before the change and the tentative record after it. It
returns `None` (no opinion) or a decision:

    RuleDecision.accept()              let the change through unchanged
    RuleDecision.transform(change)     merge this replacement change instead
    RuleDecision.reject("reason")      refuse it: the device gets `rule_rejected`

Rules are listed in the server configuration as `"package.module:function"` entries and
loaded with `load_rules()`. They must be pure and fast: no I/O, no clocks.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from schemas.collection import CollectionSpec
from schemas.wire import Change
from waystation.errors import ConfigError

if TYPE_CHECKING:
    from waystation.merge import RecordState

_ENTRY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What a rule sees: the change, its writer, the schema and the record around it.

    `before` is the stored record (None if the change creates it); `after` is the
    record as it would be with the change merged (tentative: not stored yet).
    """

    change: Change
    dev: str
    spec: CollectionSpec
    before: RecordState | None
    after: RecordState


@dataclass(frozen=True, slots=True)
class RuleDecision:
    """A rule's verdict on one change."""

    action: Literal["accept", "transform", "reject"]
    change: Change | None = None
    reason: str = ""

    @classmethod
    def accept(cls) -> RuleDecision:
        return cls("accept")

    @classmethod
    def transform(cls, change: Change) -> RuleDecision:
        """Merge `change` instead. It must keep the original's n, c, k and s."""
        return cls("transform", change=change)

    @classmethod
    def reject(cls, reason: str) -> RuleDecision:
        """Refuse the change; `reason` is sent to the device and should say what to do."""
        return cls("reject", reason=reason)


Rule = Callable[[RuleContext], RuleDecision | None]
"""A business rule: returns a decision, or None for no opinion."""


def load_rules(entries: Iterable[str]) -> list[Rule]:
    """Import each `"package.module:function"` entry; ConfigError names a bad entry."""
    rules: list[Rule] = []
    for entry in entries:
        if not isinstance(entry, str) or not _ENTRY_RE.fullmatch(entry):
            raise ConfigError(
                f"rule entry {entry!r} is not of the form 'package.module:function'")
        module_name, _, attr = entry.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"rule entry {entry!r}: cannot import module "
                              f"{module_name!r} ({exc})") from None
        except Exception as exc:  # a broken rule module must not crash with a traceback
            raise ConfigError(f"rule entry {entry!r}: importing {module_name!r} failed: "
                              f"{type(exc).__name__}: {exc}") from None
        func: Any = getattr(module, attr, None)
        if func is None:
            raise ConfigError(f"rule entry {entry!r}: module {module_name!r} has no "
                              f"attribute {attr!r}")
        if not callable(func):
            raise ConfigError(f"rule entry {entry!r}: {attr!r} is not a function")
        rules.append(func)
    return rules


def strip_strings(ctx: RuleContext) -> RuleDecision | None:
    """Example rule: trim leading/trailing whitespace from string values of string fields.

    Enable with `rules = ["waystation.rules:strip_strings"]`. The device gets the
    trimmed value back in its ack (`fx`), because the stored value differs from what it
    wrote.
    """
    change = ctx.change
    if not change.f:
        return None
    fields = ctx.spec.fields
    trimmed: dict[str, Any] | None = None
    for name, value in change.f.items():
        spec = fields.get(name)
        if spec is None or spec.type != "string" or not isinstance(value, str):
            continue
        clean = value.strip()
        if clean != value:
            if trimmed is None:
                trimmed = dict(change.f)
            trimmed[name] = clean
    if trimmed is None:
        return None
    return RuleDecision.transform(change.model_copy(update={"f": trimmed}))


__all__ = ["Rule", "RuleContext", "RuleDecision", "load_rules", "strip_strings"]
