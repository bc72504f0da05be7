"""The one convention every config section follows: documented, range-checked fields on a frozen dataclass.

    @dataclass(frozen=True)
    class EMAConfig(Section):
        enabled: bool = field(False, "Keep an EMA of the weights.")
        decay: float = field(0.9999, "EMA decay per optimizer step.", ge=0, le=1)

`field(default, doc, ge=, gt=, le=, lt=, choices=)` keeps the doc (what `pretrain train --describe-config`
prints) and the allowed range in the field's metadata; `Section.__post_init__` checks every field against it
and then runs the section's own cross-field rules (`validate`). A violation raises `FieldError` naming the
field; `from_dict` (below) turns it into a `ConfigError` naming the dotted key. This module imports
nothing of the project, so every section (run, data, objective) can use it.

The generic part of loading lives here too: `from_dict` (strict: unknown keys with the closest valid one,
types through `_coerce`, ranges through the sections), `to_dict`, `schema_at` (for `--set` paths) and
`describe`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A config key or value that does not fit the schema; the message names the dotted key."""


class FieldError(ConfigError):
    """A value outside its field's range; `key` is relative to the section (the loader prefixes the path)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def field(
    default: Any,
    doc: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple | None = None,
) -> Any:
    """A dataclass field with its documentation and allowed values. Mutable defaults and sections (a
    dataclass type or instance) get a factory, so no two configs share one."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    metadata = {"doc": doc, "bounds": bounds, "choices": choices}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_TESTS = {
    "ge": (lambda v, b: v >= b, ">="),
    "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="),
    "lt": (lambda v, b: v < b, "<"),
}


def check_field(f: dataclasses.Field, value: Any) -> None:
    """Raise FieldError when `value` is outside `f`'s choices or bounds (None passes: the type allows it)."""
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise FieldError(f.name, f"{value!r} is not one of {list(choices)}")
    bounds = f.metadata.get("bounds") or {}
    if bounds and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not all(_TESTS[k][0](value, bound) for k, bound in bounds.items()):
            wanted = " and ".join(f"{_TESTS[k][1]} {bound:g}" for k, bound in bounds.items())
            raise FieldError(f.name, f"must be {wanted}, got {value!r}")


class Section:
    """Base of every config section (a frozen dataclass): fields checked at construction, then `validate`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field rules of the section; raise FieldError(key, reason)."""

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field during __post_init__ (e.g. a list given for a tuple) despite frozen=True."""
        object.__setattr__(self, name, value)


# ---------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _number(value: Any, kind: type, what: str, key: str) -> Any:
    """int or float from a number or a numeric string (YAML 1.1 reads `1e-3`, with no dot, as a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key}: expected {what}, got {value!r}") from None


def _exact(kind: type, what: str):
    def check(value: Any, key: str) -> Any:
        if isinstance(value, kind):
            return value
        raise ConfigError(f"{key}: expected {what}, got {value!r}")

    return check


_SCALARS = {
    bool: _exact(bool, "true/false"),
    str: _exact(str, "a string"),
    int: lambda v, key: _number(v, int, "an integer", key),
    float: lambda v, key: _number(v, float, "a number", key),
}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the type hint `tp`, converting only int->float, numeric strings, lists->tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value in args:
            return value
        near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (tuple, list):
        return _coerce_sequence(value, origin, args, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if tp in _SCALARS:
        return _SCALARS[tp](value, key)
    raise ConfigError(f"{key}: cannot check {value!r} against {_type_name(tp)}")


def _coerce_sequence(value: Any, origin: type, args: tuple, key: str) -> list | tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
    else:
        items = [_coerce(v, args[0] if args else Any, f"{key}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _unknown_key(key: str, valid: list[str], where: str) -> ConfigError:
    full = f"{where}.{key}" if where else key
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{(where + '.') if where else ''}{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(sorted(valid))})")


def from_dict(cls: type, data: dict | None, where: str = "") -> Any:
    """Build dataclass `cls` from a plain mapping, strictly (see the module docstring)."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise _unknown_key(str(key), names, where)
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    try:
        return cls(**kwargs)
    except FieldError as err:  # a range or cross-field rule of this section: name the dotted key
        raise ConfigError(f"{where + '.' if where else ''}{err.key}: {err.reason}") from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def to_dict(obj: Any) -> Any:
    """A YAML-safe plain structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def schema_at(cls: Any, parts: list[str], key: str) -> None:
    """Fail early (naming the key) when an override path does not exist in the schema."""
    tp = cls
    for i, part in enumerate(parts):
        if typing.get_origin(tp) is dict or tp is Any:
            return  # free-form mapping (model.overrides.*)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {key}: '{'.'.join(parts[:i])}' is a value, not a section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise _unknown_key(part, list(hints), ".".join(parts[:i]))
        tp = hints[part]
        if typing.get_origin(tp) in (Union, types.UnionType):
            non_none = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = non_none[0] if len(non_none) == 1 else Any


def describe(cls: type, prefix: str = "") -> list[str]:
    """One line per key: dotted key, type, default, allowed values, doc (`pretrain train --describe-config`).
    A list of sections (`data.sources`) is described once, as `data.sources[].<key>`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, tp, doc = f"{prefix}{f.name}", hints[f.name], f.metadata.get("doc", "")
        if dataclasses.is_dataclass(tp):
            lines.append(f"{key}: [{tp.__name__}] {doc}")
            lines.extend(describe(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        allowed = _allowed(f)
        lines.append(f"  {key}: {_type_name(tp)} = {to_dict(default)!r}{allowed}  # {doc}")
        item = (typing.get_args(tp) or (None,))[0]
        if typing.get_origin(tp) is list and dataclasses.is_dataclass(item):
            lines.extend(describe(item, key + "[]."))
    return lines


def _allowed(f: dataclasses.Field) -> str:
    if f.metadata.get("choices"):
        return f" (one of {list(f.metadata['choices'])})"
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    bounds = f.metadata.get("bounds") or {}
    return f" ({', '.join(f'{signs[k]} {v:g}' for k, v in bounds.items())})" if bounds else ""
