"""`convert` (any supported checkpoint → official / HF / safetensors / consolidated / universal) and
`load_pretrained` (any supported checkpoint → an InternImage's weights, for `model.init_from`)."""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .keys import choose_prefix, hf_to_official, is_classifier_key, is_head_key, official_to_hf
from .sources import HF_MODEL_TYPE, RECORD_KEY, ST_WEIGHTS, Source, open_source, read_safetensors
from .spec import head_summary, record_from_variant, resolve_and_validate
from .tensors import DTYPES, ConvertError, LazyTensor, atomic_output, materialize, write_safetensors
from .zero import to_universal

FORMATS = ("official", "hf", "safetensors", "consolidated", "universal")
FORMAT_VERSION = 1


def infer_format(dst: str | os.PathLike) -> str:
    name = str(dst).rstrip("/")
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(".pth"):
        return "official"
    if name.endswith((".pt", ".bin")):
        return "consolidated"
    raise ConvertError(f"cannot tell the output format from {dst!r}: pass --to one of {', '.join(FORMATS)}")


def backbone_tensors(source: Source, prefix: str | None) -> tuple[dict[str, LazyTensor], str, int]:
    """The backbone under `prefix` (auto-detected when None/"auto") in the official key scheme.

    Returns (tensors, prefix used, number of keys outside the backbone that were left out). HF-port names
    (`model.` prefix, `layer_scale1/2`) are mapped back to the official ones.
    """
    if prefix is None and source.format == "hf":
        prefix = "model."
    try:
        chosen = choose_prefix(source.tensors, prefix)
    except ValueError as err:
        raise ConvertError(f"{source.path}: {err}") from err
    out: dict[str, LazyTensor] = {}
    for key, lazy in source.tensors.items():
        if not key.startswith(chosen):
            continue
        rest = key[len(chosen) :]
        official = (
            hf_to_official("model." + rest) if rest.endswith((".layer_scale1", ".layer_scale2")) else rest
        )
        out[official] = lazy
    return out, chosen, len(source.tensors) - len(out)


def _claimed_record(
    source: Source, model: str | None, model_kwargs: dict | None, num_classes: int | None
) -> dict | None:
    if model is not None:
        return record_from_variant(model, num_classes, model_kwargs)
    if source.record is not None:
        record = {"variant": source.record.get("variant"), "kwargs": dict(source.record.get("kwargs", {}))}
        record["kwargs"].update(model_kwargs or {})
        return record
    if model_kwargs:
        raise ConvertError("--model-kwargs needs --model VARIANT (the options are overrides of a variant)")
    return None


@dataclass
class Report:
    src: str
    src_format: str
    dst: str | None = None
    format: str | None = None
    variant: str | None = None
    kwargs: dict | None = None
    prefix: str | None = None
    tensors: int = 0
    bytes: int = 0
    dtype: str | None = None
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.src} ({self.src_format}) -> {self.dst} ({self.format})"]
        if self.variant or self.kwargs:
            lines.append(f"  model: {self.variant or 'custom'} {json.dumps(self.kwargs, sort_keys=True)}")
        if self.prefix is not None:
            lines.append(f"  backbone prefix: {self.prefix!r}")
        lines.append(
            f"  {self.tensors} tensors, {self.bytes / 2**20:.1f} MiB, dtype {self.dtype or 'as stored'}"
        )
        for key, value in self.info.items():
            lines.append(f"  {key}: {value}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _progress_bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not enabled)


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: str | None = None,
    model: str | None = None,
    model_kwargs: dict | None = None,
    prefix: str | None = None,
    tag: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = False,
) -> Report:
    """Convert the checkpoint at `src` into `dst` in format `to` (inferred from `dst`'s suffix if None).

    - official: `.pth` with `{'model': state_dict}` in the official key scheme (plus our record under
      `internimage_pretrain`, which official loaders ignore);
    - hf: a directory with config.json (the HF port's keywords, `model_type: intern_image`) and
      model.safetensors (`model.` prefix, `layer_scale1/2`, no head modules);
    - safetensors: `X.safetensors` (record in the metadata) or a directory with model.safetensors +
      config.json recording the variant and its options;
    - consolidated: a flat torch state dict of the whole DeepSpeed-wrapped module (every prefix kept
      unless --prefix selects the backbone);
    - universal: DeepSpeed's universal checkpoint of a ZeRO checkpoint, to resume on another world size.
    Everything is validated before anything is written; the output appears atomically or not at all.
    """
    to = to or infer_format(dst)
    if to not in FORMATS:
        raise ConvertError(f"unknown output format {to!r} (choose from {', '.join(FORMATS)})")
    if dtype and dtype not in DTYPES:
        raise ConvertError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    target = DTYPES[dtype] if dtype else None

    if to == "universal":
        if dtype:
            raise ConvertError(
                "a universal checkpoint keeps the fp32 optimizer state: --dtype does not apply"
            )
        return _convert_universal(src, dst, tag, overwrite)

    source = open_source(src, tag=tag, allow_pickle=allow_pickle)
    report = Report(
        str(src), source.format, str(dst), to, dtype=dtype, info=dict(source.info), notes=list(source.notes)
    )
    tensors = _select_tensors(source, to, model, model_kwargs, prefix, report)
    total = sum(LazyTensor(v.shape, _out_dtype(v.dtype, target), v.loader).nbytes for v in tensors.values())
    report.tensors, report.bytes = len(tensors), total
    record = {
        "variant": report.variant,
        "kwargs": report.kwargs,
        "format_version": FORMAT_VERSION,
        "dtype": dtype or "as stored",
    }
    write = _WRITERS["safetensors_file" if to == "safetensors" and str(dst).endswith(".safetensors") else to]
    # torch.save needs every tensor in memory at once. Cast tensors and ZeRO gathers would be new
    # allocations on top of the memory-mapped source, so they are first streamed to a temporary
    # safetensors file and the source is released: the .pth is then written from that file's mmap.
    # (The spill stays in this frame: a helper's caller would keep `source` alive.)
    spill = to in ("official", "consolidated") and (target is not None or source.format == "deepspeed")
    dst_path = Path(dst)
    spill_path = dst_path.with_name(f".{dst_path.name}.spill-{os.getpid()}.safetensors")
    try:
        with _progress_bar(total * (2 if spill else 1), progress, f"convert -> {to}") as bar:
            if spill:
                if dst_path.exists() and not overwrite:
                    raise ConvertError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
                write_safetensors(spill_path, tensors, dtype=target, progress=bar.update)
                order = list(tensors)
                del tensors, source
                gc.collect()
                spilled = read_safetensors(spill_path).tensors  # (safetensors lists keys sorted)
                tensors, target = {k: spilled[k] for k in order}, None
            with atomic_output(dst, overwrite=overwrite) as tmp:
                write(tmp, tensors, target, record, DTYPES.get(dtype or ""), bar.update)
    finally:
        tensors = None
        spill_path.unlink(missing_ok=True)
    return report


def _convert_universal(src, dst, tag: str | None, overwrite: bool) -> Report:
    report = Report(str(src), "deepspeed", str(dst), "universal")
    with atomic_output(dst, overwrite=overwrite) as tmp:
        info = to_universal(src, tmp, tag)
    report.notes += info.pop("notes")
    report.info.update(info)
    report.notes.append('resume with "checkpoint": {"load_universal": true} in the DeepSpeed config')
    return report


def _select_tensors(
    source: Source, to: str, model: str | None, model_kwargs: dict | None, prefix: str | None, report: Report
) -> dict[str, LazyTensor]:
    """The tensors `to` writes, validated against the variant (recorded in `report`): the whole module for
    consolidated without --prefix, else the backbone in the official keys (the HF port's for hf)."""
    if to == "consolidated" and prefix is None:
        if model is not None:  # validate the backbone inside, if asked to say what it is
            bb, used, _ = backbone_tensors(source, "auto")
            record = resolve_and_validate(
                bb,
                claimed=_claimed_record(source, model, model_kwargs, None),
                headless_ok=False,
                what=f"the backbone under {used!r} of {source.path}",
            )
            report.variant, report.kwargs, report.prefix = record["variant"], record["kwargs"], used
        return source.tensors
    tensors, used, left_out = backbone_tensors(source, prefix)
    report.prefix = used
    if left_out:
        report.notes.append(f"{left_out} tensors outside the backbone prefix {used!r} left out")
    headless = source.format == "hf" or not any(is_head_key(k) for k in tensors)
    claimed = _claimed_record(source, model, model_kwargs, None)
    record = resolve_and_validate(tensors, claimed=claimed, headless_ok=headless, what=str(report.src))
    report.variant, report.kwargs = record["variant"], record["kwargs"]
    report.notes.append(head_summary({k: v.shape for k, v in tensors.items()}))
    if to == "official" and headless and not any(is_head_key(k) for k in tensors):
        report.notes.append("the source has no head modules: load the .pth with strict=False (backbone only)")
    if to == "hf":
        dropped = [k for k in tensors if is_head_key(k)]
        if dropped:
            report.notes.append(f"HF layout carries no head modules: {len(dropped)} head tensors left out")
        tensors = {official_to_hf(k): v for k, v in tensors.items() if not is_head_key(k)}
    return tensors


# One writer per output format: (tmp path, tensors, cast dtype or None, record, named dtype, progress).
def _write_official(tmp: Path, tensors, target, record, named, update) -> None:
    _write_torch(tmp, tensors, target, update, official=True, record=record)


def _write_consolidated(tmp: Path, tensors, target, record, named, update) -> None:
    _write_torch(tmp, tensors, target, update, official=False, record=record)


def _write_safetensors_file(tmp: Path, tensors, target, record, named, update) -> None:
    write_safetensors(tmp, tensors, dtype=target, metadata=_st_metadata(record), progress=update)


def _write_directory(tmp: Path, tensors, target, record, config: dict, update) -> None:
    tmp.mkdir()
    write_safetensors(tmp / ST_WEIGHTS, tensors, dtype=target, metadata=_st_metadata(record), progress=update)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_safetensors_dir(tmp: Path, tensors, target, record, named, update) -> None:
    _write_directory(tmp, tensors, target, record, {RECORD_KEY: record}, update)


def _write_hf(tmp: Path, tensors, target, record, named, update) -> None:
    _write_directory(tmp, tensors, target, record, _hf_config(record, target or named), update)


_WRITERS = {
    "official": _write_official,
    "consolidated": _write_consolidated,
    "safetensors_file": _write_safetensors_file,
    "safetensors": _write_safetensors_dir,
    "hf": _write_hf,
}


def _out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and dtype.is_floating_point else dtype


def _st_metadata(record: dict) -> dict[str, str]:
    return {"format": "pt", RECORD_KEY: json.dumps(record, sort_keys=True)}


def _hf_config(record: dict, target: torch.dtype | None) -> dict:
    kwargs = dict(record["kwargs"] or {})
    config = {
        "model_type": HF_MODEL_TYPE,
        "architectures": ["InternImageModel"],
        "core_op": "DCNv3",
        "torch_dtype": str(target or torch.float32).replace("torch.", ""),
        **kwargs,
        RECORD_KEY: record,
    }
    return config


def _write_torch(
    path: Path,
    tensors: dict[str, LazyTensor],
    target,
    update: Callable[[int], None],
    *,
    official: bool,
    record: dict,
) -> None:
    state = {}
    for key, lazy in tensors.items():
        tensor = materialize(lazy, target)
        state[key] = tensor
        update(tensor.numel() * tensor.element_size())
    obj = {"model": state, RECORD_KEY: record} if official else state
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------- load_pretrained
@dataclass
class LoadReport:
    """What `load_pretrained` did. `loaded` keys got the checkpoint's values; the others kept their init."""

    source: str
    format: str
    target: str  # "model" or "model.backbone"
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    skipped_head: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"loaded {len(self.loaded)} tensors from {self.source} ({self.format}) into {self.target}"
        for name in ("missing", "unexpected", "mismatched", "skipped_head"):
            items = getattr(self, name)
            if items:
                s += f"; {len(items)} {name.replace('_', ' ')}"
        return s


def load_pretrained(
    path_or_dir: str | os.PathLike,
    model: torch.nn.Module,
    *,
    strict: bool = True,
    drop_head: bool = False,
    prefix: str | None = None,
    tag: str | None = None,
    allow_pickle: bool = False,
) -> LoadReport:
    """Copy released or converted weights into `model` (an InternImage, or any module with a `.backbone`).

    Accepts an official `.pth`, an HF directory, safetensors (file or directory), a consolidated state dict
    or a DeepSpeed checkpoint directory (its backbone is found under `prefix`, auto-detected by default).
    `strict=True` refuses, naming the first offenders, any shape mismatch, unexpected key or missing
    backbone key; head modules may be absent only when the source has none at all (the HF layout), in
    which case the model's heads keep their initialisation. `drop_head=True` never loads the classifier
    (`head.*`): fine-tuning a 22K checkpoint on another label set. `strict=False` loads what matches and
    reports the rest. Tensors are copied one at a time, cast to each parameter's dtype.
    """
    from .spec import diff_shapes

    source = open_source(path_or_dir, tag=tag, allow_pickle=allow_pickle)
    tensors, _, _ = backbone_tensors(source, prefix)
    target, label = model, "model"
    own = target.state_dict()
    if "patch_embed.conv1.weight" not in own and hasattr(model, "backbone"):
        target, label = model.backbone, "model.backbone"
        own = target.state_dict()
    report = LoadReport(str(path_or_dir), source.format, label, notes=list(source.notes))
    if drop_head:
        report.skipped_head = [k for k in tensors if is_classifier_key(k)]
        tensors = {k: v for k, v in tensors.items() if not is_classifier_key(k)}
    source_headless = not any(is_head_key(k) for k in tensors)
    expected = {k: tuple(v.shape) for k, v in own.items()}
    diff = diff_shapes(
        {k: v.shape for k, v in tensors.items()}, expected, headless_ok=source_headless or drop_head
    )
    report.unexpected, report.mismatched = diff.unexpected, diff.mismatched
    report.missing = [k for k in expected if k not in tensors]
    if drop_head:
        diff.missing = [k for k in diff.missing if not is_classifier_key(k)]
    if strict and not diff.ok:
        hint = ""
        if any(is_classifier_key(k) for k, _, _ in diff.mismatched):
            hint = " (a classifier of another size: pass drop_head=True to keep the model's own head)"
        raise ConvertError(f"{path_or_dir} does not fit {type(target).__name__}: {diff.describe()}{hint}")
    if source_headless and any(is_head_key(k) for k in expected):
        report.notes.append("the checkpoint has no head modules: the model's heads keep their initialisation")
    bad = {k for k, _, _ in diff.mismatched}
    with torch.no_grad():
        for key, lazy in tensors.items():
            if key not in own or key in bad:
                continue
            dest = own[key]
            dest.copy_(lazy.load().to(dtype=dest.dtype))
            report.loaded.append(key)
    return report
