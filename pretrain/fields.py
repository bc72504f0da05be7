"""The one convention every config section follows: documented, range-checked fields on a frozen dataclass.

    @dataclass(frozen=True)
    class EMAConfig(Section):
        enabled: bool = field(False, "Keep an EMA of the weights.")
        decay: float = field(0.9999, "EMA decay per optimizer step.", ge=0, le=1)

`field(default, doc, ge=, gt=, le=, lt=, choices=)` keeps the doc (what `pretrain train --describe-config`
prints) and the allowed range in the field's metadata; `Section.__post_init__` checks every field against it
and then runs the section's own cross-field rules (`validate`). A violation raises `FieldError` naming the
field; `pretrain.config.from_dict` turns it into a `ConfigError` naming the dotted key. This module imports
nothing of the project, so every section (run, data, objective) can use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any


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
