"""Validation: every key and shape of a backbone state dict against the model it claims to be.

Expected shapes come from building the model on the meta device (no memory, fast even for G). The
number of classes is read from the checkpoint's own classifier, so the official 22K heads (21841
classes) validate against their variant like the 1K ones.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .keys import CLASSIFIER_MODULES, HEAD_MODULES, is_head_key, top_module
from .tensors import ConvertError, LazyTensor

# Options that choose how the model runs, not what weights it has: never part of a recorded config.
RUNTIME_OPTIONS = ("dcn_backend", "core_op", "with_cp")


def constructor_keys() -> frozenset[str]:
    from pretrain.models import InternImage

    return frozenset(p for p in inspect.signature(InternImage.__init__).parameters if p != "self")


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


def model_record(model: torch.nn.Module) -> dict:
    """{"variant": name or None, "kwargs": constructor keywords} of an InternImage instance."""
    config = getattr(model, "config", None)
    if not isinstance(config, Mapping):
        raise ConvertError(f"{type(model).__name__} has no `config` dict of constructor keywords")
    kwargs = {k: _jsonable(v) for k, v in config.items() if k not in RUNTIME_OPTIONS}
    return {"variant": getattr(model, "variant", None), "kwargs": kwargs}


def record_from_variant(variant: str, num_classes: int | None, overrides: dict | None = None) -> dict:
    from pretrain.models import variant_config

    overrides = dict(overrides or {})
    if num_classes is not None:
        overrides.setdefault("num_classes", num_classes)
    try:
        kwargs = variant_config(variant, **overrides)
    except (KeyError, TypeError) as err:
        raise ConvertError(str(err).strip("'\"")) from err
    kwargs = {k: _jsonable(v) for k, v in kwargs.items() if k not in RUNTIME_OPTIONS}
    return {"variant": variant, "kwargs": kwargs}


@functools.lru_cache(maxsize=32)
def _expected(kwargs_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from pretrain.models import InternImage

    kwargs = json.loads(kwargs_json)
    with torch.device("meta"):
        model = InternImage(**kwargs, core_op="DCNv3_pytorch")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def expected_shapes(kwargs: dict) -> dict[str, tuple[int, ...]]:
    kwargs = {k: v for k, v in kwargs.items() if k not in RUNTIME_OPTIONS}
    return dict(_expected(json.dumps(kwargs, sort_keys=True)))


def infer_num_classes(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Classes of the checkpoint's classifier; 0 for a headless classifier, None if it has no head modules."""
    if "head.weight" in shapes:
        return int(shapes["head.weight"][0])
    if any(is_head_key(k) for k in shapes):
        return 0
    return None


@dataclass
class Diff:
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple, tuple]]  # key, checkpoint shape, model shape
    matched: int

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 5) -> str:
        parts = []
        if self.mismatched:
            items = "; ".join(
                f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in self.mismatched[:limit]
            )
            parts.append(f"{len(self.mismatched)} shape mismatch(es), first: {items}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing key(s), first: {', '.join(self.missing[:limit])}")
        if self.unexpected:
            parts.append(
                f"{len(self.unexpected)} unexpected key(s), first: {', '.join(self.unexpected[:limit])}"
            )
        return "; ".join(parts)


def diff_shapes(
    actual: Mapping[str, tuple], expected: Mapping[str, tuple], *, headless_ok: bool = False
) -> Diff:
    missing = [k for k in expected if k not in actual and not (headless_ok and is_head_key(k))]
    unexpected = [k for k in actual if k not in expected]
    mismatched = [
        (k, tuple(actual[k]), tuple(expected[k]))
        for k in actual
        if k in expected and tuple(actual[k]) != tuple(expected[k])
    ]
    return Diff(missing, unexpected, mismatched, sum(1 for k in actual if k in expected) - len(mismatched))


def rank_variants(shapes: Mapping[str, tuple], num_classes: int | None) -> list[tuple[str, int, int]]:
    """Registered variants ordered by how many checkpoint keys they match: (name, matched, total keys)."""
    from pretrain.models import list_models

    scores = []
    for name in list_models():
        record = record_from_variant(name, num_classes if num_classes is not None else 1000)
        d = diff_shapes(shapes, expected_shapes(record["kwargs"]), headless_ok=True)
        scores.append((name, d.matched, len(d.missing) + d.matched + len(d.mismatched)))
    scores.sort(key=lambda s: (-s[1] / max(s[2], 1), -s[1]))
    return scores


def _likely(shapes: Mapping[str, tuple], num_classes: int | None, exclude: str | None = None) -> str:
    ranked = [r for r in rank_variants(shapes, num_classes) if r[0] != exclude]
    if not ranked:
        return ""
    name, matched, total = ranked[0]
    if matched == total == len(shapes):
        return f"; it looks like {name} (all {matched} keys match)"
    return f"; closest registered variant: {name} ({matched}/{total} keys match)"


def resolve_and_validate(
    tensors: Mapping[str, LazyTensor],
    *,
    claimed: dict | None,
    headless_ok: bool,
    what: str,
) -> dict:
    """Check `tensors` (official key scheme) against the claimed model and return its record.

    `claimed` is a record ({"variant", "kwargs"}) from --model or from the file itself; without one the
    variant is detected among the registered ones and must match exactly. The classifier's size always
    comes from the checkpoint. `headless_ok` accepts a checkpoint without head modules (the HF layout).
    """
    shapes = {k: v.shape for k, v in tensors.items()}
    num_classes = infer_num_classes(shapes)
    if claimed is None:
        ranked = rank_variants(shapes, num_classes)
        name, matched, total = ranked[0]
        if matched != total or matched != len(shapes):
            raise ConvertError(
                f"{what} matches no registered InternImage variant exactly (closest: {name}, {matched}/{total} "
                "keys match); say what it is with --model VARIANT (and --model-kwargs for non-standard options)"
            )
        claimed = record_from_variant(name, num_classes)
    kwargs = dict(claimed["kwargs"])
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    record = {"variant": claimed.get("variant"), "kwargs": kwargs}
    try:
        expected = expected_shapes(kwargs)
    except (TypeError, ValueError) as err:
        raise ConvertError(f"cannot build the claimed model {record['variant'] or kwargs}: {err}") from err
    diff = diff_shapes(shapes, expected, headless_ok=headless_ok)
    if not diff.ok:
        label = record["variant"] or "the claimed model"
        raise ConvertError(
            f"{what} is not {label}: {diff.describe()}{_likely(shapes, num_classes, exclude=record['variant'])}"
        )
    return record


def head_summary(shapes: Mapping[str, tuple]) -> str:
    heads = sorted({top_module(k) for k in shapes if is_head_key(k)})
    if not heads:
        return "no head modules"
    nc = infer_num_classes(shapes)
    cls = (
        f", {nc}-class classifier" if nc and any(top_module(k) in CLASSIFIER_MODULES for k in shapes) else ""
    )
    return f"heads {heads}{cls}"


__all__ = ["HEAD_MODULES", "resolve_and_validate", "model_record", "record_from_variant", "expected_shapes"]
