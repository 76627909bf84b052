"""Loading a config: TOML, environment overrides, paths, error messages."""

from __future__ import annotations

import difflib
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    SecretStr,
    ValidationError,
)

from waystation.config.common import (
    _CREDENTIAL_PATHS,
    _TOML_EOF_RE,
    _TOML_POS_RE,
    _VAR_RE,
    ENV_PREFIX,
    T,
    expand_path,
)
from waystation.config.dump import _mask_url, _toml_scalar
from waystation.errors import ConfigError

# ------------------------------------------------------------------------- loading

def load_config(model: type[T], path: Path | str | None = None,
                env: Mapping[str, str] | None = None, *, part: str | None = None) -> T:
    """Load `model` from the TOML file `path` (None: defaults only), then apply the
    `WAYSTATION_<PART>__...` overrides found in `env`, then validate.

    `part` defaults to the model's PART ("agent", "server", "broker"). Every problem is
    a ConfigError naming the file or variable and the dotted key.
    """
    return _load(model, path, env, part)[0]


def env_overrides(model: type[BaseModel], env: Mapping[str, str] | None,
                  part: str | None = None) -> dict[str, str]:
    """The override variables in `env` for this part, mapped to the dotted key each sets
    (ConfigError for one that names no setting)."""
    items = _env_items(model, env or {}, _part(model, part))
    return {var: ".".join(keys) for var, keys, _ in items}


def _part(model: type[BaseModel], part: str | None) -> str:
    name = part if part is not None else getattr(model, "PART", None)
    if not name:
        raise ValueError(f"{model.__name__} has no PART; pass part=")
    return str(name)


def _load(model: type[T], path: Path | str | None, env: Mapping[str, str] | None,
          part: str | None) -> tuple[T, dict[str, str]]:
    env = env if env is not None else {}
    part_name = _part(model, part)
    source = str(path) if path is not None else f"{part_name} config (defaults)"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_toml(Path(path))
        _prepare_paths(model, data, Path(path).absolute().parent, env, source, ())
    env_sources: dict[tuple[str, ...], str] = {}
    for var, keys, value in _env_items(model, env, part_name):
        if isinstance(value, str) and _is_path_field(model, keys):
            value = _expand_config_path(value, env, keys, var, None)
        _set_nested(data, keys, value)
        env_sources[keys] = var
    if path is not None:
        _anchor_default_paths(model, data, Path(path).absolute().parent)
    try:
        config = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model, source, env_sources)) from None
    return config, {var: ".".join(keys) for keys, var in env_sources.items()}


def _anchor_default_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> None:
    """Relative built-in default paths (e.g. data_dir) of a config read from a file are
    relative to the file's directory, like every path written in it: the same file used
    from any working directory names the same store."""
    for key, field in model.model_fields.items():
        if key in data or Path not in _unwrap(field.annotation):
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, Path) and not default.is_absolute():
            data[key] = str(base / default)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        pos = _TOML_POS_RE.search(msg)
        if pos:
            where = f"line {pos.group(1)}, column {pos.group(2)}"
            msg = msg[: pos.start()]
        else:
            where = f"line {text.count(chr(10)) + 1} (end of file)"
            msg = _TOML_EOF_RE.sub("", msg)
        raise ConfigError(f"{path}: {where}: invalid TOML: {msg}") from None


# ---- walking the models' field types

def _unwrap(annotation: Any) -> list[Any]:
    """The alternatives of a (possibly Optional / Union / Annotated) annotation."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def _model_at(model: type[BaseModel], keys: tuple[str | int, ...]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for key in keys:
        if current is None or not isinstance(key, str) or key not in current.model_fields:
            return None
        current = _submodel(current.model_fields[key].annotation)
    return current


def _is_path_field(model: type[BaseModel], keys: tuple[str, ...]) -> bool:
    parent = _model_at(model, keys[:-1])
    field = parent.model_fields.get(keys[-1]) if parent is not None else None
    return field is not None and Path in _unwrap(field.annotation)


def _stringish(annotation: Any) -> tuple[bool, bool]:
    """(every non-None alternative is a string-like type, None is allowed)."""
    alts = _unwrap(annotation)
    nullable = type(None) in alts
    stringy = True
    for alt in alts:
        if alt is type(None):
            continue
        if typing.get_origin(alt) is Literal:
            stringy = stringy and all(isinstance(a, str) for a in typing.get_args(alt))
        else:
            stringy = stringy and alt in (str, Path, SecretStr)
    return stringy, nullable


def _prepare_paths(model: type[BaseModel], data: dict[str, Any], base: Path,
                   env: Mapping[str, str], source: str, loc: tuple[str, ...]) -> None:
    """Expand ${VAR} and anchor relative paths at the config file's directory."""
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            continue
        if isinstance(value, str) and Path in _unwrap(field.annotation):
            data[key] = _expand_config_path(value, env, (*loc, key), source, base)
        elif isinstance(value, dict):
            sub = _submodel(field.annotation)
            if sub is not None:
                _prepare_paths(sub, value, base, env, source, (*loc, key))


def _expand_config_path(value: str, env: Mapping[str, str], keys: tuple[str, ...],
                        source: str, base: Path | None) -> str:
    unset = [m.group(1) for m in _VAR_RE.finditer(value) if m.group(1) not in env]
    if unset and keys[-1] not in _CREDENTIAL_PATHS:
        raise ConfigError(f"{source}: {'.'.join(keys)}: ${{{unset[0]}}} in {value!r} is not "
                          "set in the environment")
    if not unset:
        value = str(expand_path(Path(value), env))
    if base is None or value.startswith("${") or Path(value).is_absolute():
        return value
    return str(base / value)


# ---- environment overrides

def _env_items(model: type[BaseModel], env: Mapping[str, str],
               part: str) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    prefix = f"{ENV_PREFIX}{part.upper()}__"
    near = f"{ENV_PREFIX}{part.upper()}_"
    for var in sorted(env):
        upper = var.upper()
        if not upper.startswith(prefix):
            if upper.startswith(near) and "__" in upper[len(near):]:
                raise ConfigError(f"{var}: not a valid override; write {prefix}KEY__SUBKEY "
                                  "with double underscores")
            continue
        keys = tuple(var[len(prefix):].lower().split("__"))
        yield var, keys, _env_value(model, var, keys, env[var], part)


def _env_value(model: type[BaseModel], var: str, keys: tuple[str, ...], raw: str,
               part: str) -> Any:
    current: type[BaseModel] = model
    for depth, key in enumerate(keys):
        dotted = ".".join(keys[: depth + 1])
        field = current.model_fields.get(key)
        if field is None:
            raise ConfigError(f"{var}: {dotted!r} is not a setting of the {part} config"
                              f"{_suggest(key, current)}")
        if depth == len(keys) - 1:
            return _parse_env_scalar(field.annotation, raw)
        sub = _submodel(field.annotation)
        if sub is None:
            raise ConfigError(f"{var}: {'.'.join(keys[:depth + 1])!r} is a single value, "
                              "not a table; drop the rest of the name")
        current = sub
    raise ConfigError(f"{var}: names no setting")  # pragma: no cover - keys is never empty


def _parse_env_scalar(annotation: Any, raw: str) -> Any:
    stringy, nullable = _stringish(annotation)
    if raw == "" and nullable:
        return None
    if stringy:
        if raw[:1] in ("'", '"'):
            parsed = _toml_value(raw)
            if isinstance(parsed, str):
                return parsed
        return raw
    parsed = _toml_value(raw)
    return raw if parsed is _NOTHING else parsed


_NOTHING = object()


def _toml_value(raw: str) -> Any:
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return _NOTHING
    if isinstance(value, bool | int | float | str | list | dict):
        return value
    return _NOTHING  # dates and times: no setting takes one; keep the text


def _set_nested(data: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    for key in keys[:-1]:
        child = data.get(key)
        if not isinstance(child, dict):
            child = data[key] = {}
        data = child
    old = data.get(keys[-1])
    if isinstance(old, dict) and isinstance(value, dict):
        data[keys[-1]] = {**old, **value}
    else:
        data[keys[-1]] = value


# ---- error messages

def _suggest(key: str, model: type[BaseModel] | None) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(exc: ValidationError, model: type[BaseModel], source: str,
              env_sources: Mapping[tuple[str, ...], str]) -> str:
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = source
        for keys, var in env_sources.items():
            if loc[: len(keys)] == keys:
                where = var
                break
        else:
            inner = [var for keys, var in env_sources.items()
                     if keys[: len(loc)] == loc or (loc and keys[:-1] == loc[:-1])]
            if inner:
                where = f"{source} with {inner[0]}"
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            msg = "unknown key" + (_suggest(str(loc[-1]), _model_at(model, loc[:-1]))
                                   or " (not a setting here)")
        elif kind == "missing":
            msg = "required; add it"
        elif kind in _RANGE_ERRORS and (allowed := _allowed_range(model, loc)) is not None:
            # pydantic names one bound ("greater than or equal to 100") or none ("a valid
            # integer"); the operator needs the whole range to pick a value.
            msg = f"must be {allowed}"
            shown = _show(loc, err.get("input"))
            if shown:
                msg += f" (got {shown})"
        elif kind != "value_error" and err.get("input") is not None and not isinstance(
                err["input"], dict | BaseModel):
            shown = _show(loc, err["input"])
            if shown:
                msg += f" (got {shown})"
        problems.append(f"{where}: {dotted}: {msg}" if dotted else f"{where}: {msg}")
    text = problems[0]
    if len(problems) > 1:
        text += f" (and {len(problems) - 1} more: " + "; ".join(problems[1:]) + ")"
    return text


_RANGE_ERRORS = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
    "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
})


_UNITS = (("_s", "seconds"), ("_mb", "MB"), ("_bytes", "bytes"), ("_days", "days"))


def _allowed_range(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """'a whole number from 100 to 10000000' for a number setting with both bounds (None
    for anything else, whose pydantic message is kept)."""
    parent = _model_at(model, loc[:-1]) if loc and isinstance(loc[-1], str) else None
    field = parent.model_fields.get(loc[-1]) if parent is not None else None
    if field is None:
        return None
    bounds: dict[str, Any] = {}
    for meta in [*field.metadata, *_annotated_metadata(field.annotation)]:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(meta, name, None) is not None:
                bounds.setdefault(name, getattr(meta, name))
    numbers = [alt for alt in _unwrap(field.annotation) if alt in (int, float)]
    low = ("from", bounds["ge"]) if "ge" in bounds else (
        ("greater than", bounds["gt"]) if "gt" in bounds else None)
    high = ("to", bounds["le"]) if "le" in bounds else (
        ("below", bounds["lt"]) if "lt" in bounds else None)
    if len(numbers) != 1 or low is None or high is None:
        return None
    what = "a whole number" if numbers[0] is int else "a number"
    unit = next((u for end, u in _UNITS if str(loc[-1]).endswith(end)), "")
    what += f" of {unit}" if unit else ""
    joint = " " if low[0] == "from" else " and "
    upper = high[0] if low[0] == "from" or high[0] == "below" else "at most"
    return f"{what} {low[0]} {_number(low[1])}{joint}{upper} {_number(high[1])}"


def _number(value: Any) -> str:
    """100, 10000000, 0.5: as a person writes it in the TOML file."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _annotated_metadata(annotation: Any) -> list[Any]:
    """The constraints inside Annotated[...] types of an (Optional) annotation."""
    out: list[Any] = []
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        for extra in typing.get_args(annotation)[1:]:
            out.extend(getattr(extra, "metadata", [extra]))
        out.extend(_annotated_metadata(typing.get_args(annotation)[0]))
    elif origin is Union or origin is types.UnionType:
        for arg in typing.get_args(annotation):
            out.extend(_annotated_metadata(arg))
    return out


def _show(loc: tuple[Any, ...], value: Any) -> str:
    if any("password" in str(p) for p in loc):
        return ""
    if isinstance(value, str) and loc and loc[-1] == "url":
        value = _mask_url(value)
    try:
        text = _toml_scalar(value)
    except TypeError:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
