"""DeepSpeed checkpoints: find the tag, consolidate ZeRO 1/2/3 partitions lazily, convert to universal.

Works on any DeepSpeed checkpoint layout (`ROOT/latest` + `ROOT/global_stepN/`, a bare `global_stepN/`,
or our engine's per-step directories holding one) and any ZeRO stage and world size: the stage and the
number of partitions are read from the shard files themselves, never passed in.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import pickle
import re
import shutil
import zipfile
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tensors import ConvertError, LazyTensor

MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*_optim_states.pt"


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _has_model_states(path: Path) -> bool:
    return path.is_dir() and any(path.glob(MODEL_STATES))


def is_deepspeed_dir(path: Path) -> bool:
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "latest").is_file() or _has_model_states(path):
        return True
    return any(_has_model_states(d) for d in path.iterdir() if d.is_dir())


@dataclass
class DeepSpeedTag:
    root: Path
    tag: str
    notes: list[str] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.root / self.tag


def resolve_tag(path: str | Path, tag: str | None = None) -> DeepSpeedTag:
    """Find the checkpoint tag directory (the one with `*model_states.pt`) under or at `path`."""
    path = Path(path)
    if tag is not None:
        if not _has_model_states(path / tag):
            raise ConvertError(f"{path / tag} holds no DeepSpeed model states (*model_states.pt)")
        return DeepSpeedTag(path, tag)
    if _has_model_states(path):
        return DeepSpeedTag(path.parent, path.name)
    latest = path / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not _has_model_states(path / tag):
            raise ConvertError(f"{latest} names tag {tag!r} but {path / tag} holds no *model_states.pt")
        return DeepSpeedTag(path, tag)
    tags = sorted((d.name for d in path.iterdir() if _has_model_states(d)), key=_natural)
    if not tags:
        raise ConvertError(f"{path} is not a DeepSpeed checkpoint (no 'latest' file, no *model_states.pt)")
    chosen = DeepSpeedTag(path, tags[-1])
    if len(tags) > 1:
        chosen.notes.append(f"no 'latest' file: using the newest tag {tags[-1]!r} of {tags}")
    return chosen


def _zero_info(optim_file: Path) -> tuple[int, int]:
    """(zero stage, data-parallel world size) from one optimizer shard (memory-mapped, nothing read)."""
    state = torch.load(optim_file, map_location="cpu", mmap=True, weights_only=False)
    osd = state["optimizer_state_dict"]
    world = osd.get("partition_count", 1)
    world = max(world) if isinstance(world, list | tuple) else int(world)
    return int(osd.get("zero_stage", 1)), world


_LOAD_ERRORS = (
    ValueError,
    RuntimeError,
    FileNotFoundError,
    EOFError,
    KeyError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    AssertionError,
)


def _as_fp32(tensor: torch.Tensor) -> LazyTensor:
    if not tensor.is_floating_point() or tensor.dtype == torch.float32:
        return LazyTensor.of(tensor)
    return LazyTensor(tuple(tensor.shape), torch.float32, tensor.float)


def _gather(parts: list[torch.Tensor], starts: list[int], offset: int, numel: int, shape) -> torch.Tensor:
    """Elements [offset, offset + numel) of the concatenation of `parts` (partition r begins at starts[r])."""
    pieces = []
    for part, start in zip(parts, starts):
        lo, hi = max(offset, start), min(offset + numel, start + part.numel())
        if lo < hi:
            pieces.append(part[lo - start : hi - start])
    flat = pieces[0].clone() if len(pieces) == 1 else torch.cat(pieces)
    return flat.view(shape)


def _zero12_lazy(tag_dir: Path) -> dict | None:
    """ZeRO-1/2 consolidation without DeepSpeed's concatenation of whole flat groups (which holds a second
    fp32 copy of the model): each parameter is sliced out of the memory-mapped rank partitions when it is
    loaded. Same layout protocol as `zero_to_fp32._zero2_merge_trainable_params` (parameters back to back
    in each group's rank-concatenated flat buffer, plus per-parameter alignment paddings when recorded).
    Returns None (use DeepSpeed's own path) if this DeepSpeed version's helpers differ."""
    try:
        from deepspeed.utils import zero_to_fp32 as z

        stage, world, flat_groups, paddings = z.parse_optim_states(
            z.get_optim_files(str(tag_dir)), str(tag_dir)
        )
    except (ImportError, AttributeError, TypeError, ValueError):
        return None
    if stage > 2:
        return None
    # rank 0's model states, memory-mapped (DeepSpeed's parser reads the whole file, full module
    # weights included: a second copy of the model in memory)
    model_file = sorted(tag_dir.glob(MODEL_STATES), key=lambda p: _natural(p.name))[0]
    ms = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    module = ms.get("module") or {}
    # buffers in fp32 like DeepSpeed's consolidation (bf16/fp16 training saves them in the module dtype)
    state: dict = {k: _as_fp32(module[k]) for k in ms.get("buffer_names", []) if k in module}
    frozen = ms.get("frozen_param_fragments") or {}
    for name in ms.get("frozen_param_shapes") or {}:
        if name in frozen:
            state[name] = frozen[name]
    align = 2 * world
    for g, shapes in enumerate(ms["param_shapes"]):
        parts = [flat_groups[r][g] for r in range(world)]
        starts = [sum(p.numel() for p in parts[:r]) for r in range(world)]
        total = sum(p.numel() for p in parts)
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            numel = math.prod(shape)
            if offset + numel > total:
                raise ConvertError(
                    f"{tag_dir}: {name} lies beyond the saved partitions: the checkpoint is corrupt"
                )
            state[name] = LazyTensor(
                tuple(shape),
                parts[0].dtype,
                functools.partial(_gather, parts, starts, offset, numel, tuple(shape)),
            )
            offset += numel + (paddings[g][i] if paddings is not None else 0)
        if align * math.ceil(offset / align) != align * math.ceil(total / align):
            raise ConvertError(f"{tag_dir}: group {g} holds {total} elements, its parameters {offset}")
    for alias, target in (ms.get("shared_params") or {}).items():
        if target in state:
            state[alias] = state[target]
    return state


def read_deepspeed(path: str | Path, tag: str | None = None) -> tuple[dict[str, LazyTensor], dict]:
    """The consolidated fp32 state dict of the DeepSpeed-wrapped module, as lazy tensors.

    The optimizer shards are memory-mapped and only the fp32 master partitions are touched (Adam moments
    are never read); each parameter is gathered from its rank partitions when it is loaded: ZeRO-1/2 by
    `_zero12_lazy`, ZeRO-3 by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)`.
    Buffers and frozen parameters (no fp32 master) come from the module states, as fp32. A universal
    checkpoint (`<tag>/zero/<param>/fp32.pt`) is read per parameter. A checkpoint without ZeRO optimizer
    shards (ZeRO disabled, or saved without optimizer) is read from the module weights of `mp_rank_00`.
    """
    found = resolve_tag(path, tag)
    tag_dir = found.dir
    info: dict = {"tag": found.tag, "dir": str(tag_dir), "notes": list(found.notes)}
    optim_files = sorted(tag_dir.glob(OPTIM_STATES), key=lambda p: _natural(p.name))
    model_files = sorted(tag_dir.glob(MODEL_STATES), key=lambda p: _natural(p.name))
    try:
        if (
            not optim_files and (tag_dir / "zero").is_dir()
        ):  # a universal checkpoint (ours or ds_to_universal's)
            state = _universal_lazy(tag_dir / "zero", model_files[0])
            info.update(zero_stage="universal", world_size=None, gather="one fp32 file per parameter")
        elif not optim_files:
            state = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)
            module = state.get("module")
            if not isinstance(module, dict) or not module:
                raise ConvertError(
                    f"{model_files[0]} has no module weights and {tag_dir} has no ZeRO optimizer shards: "
                    "nothing to consolidate"
                )
            info.update(zero_stage=0, world_size=None)
            info["notes"].append("no ZeRO optimizer shards: module weights taken from " + model_files[0].name)
            return {k: LazyTensor.of(v) for k, v in module.items() if isinstance(v, torch.Tensor)}, info

        else:
            state = _zero_lazy(found, optim_files, info)
    except ConvertError:
        raise
    except _LOAD_ERRORS as err:
        raise ConvertError(f"DeepSpeed checkpoint {tag_dir} is incomplete or corrupt: {err}") from err
    return _complete(state, model_files, info), info


def _zero_lazy(found: DeepSpeedTag, optim_files: list[Path], info: dict) -> dict:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = found.dir
    stage, world = _zero_info(optim_files[0])
    info.update(zero_stage=stage, world_size=world)
    if world != len(optim_files):
        raise ConvertError(
            f"{tag_dir}: ZeRO-{stage} checkpoint of {world} ranks but {len(optim_files)} optimizer shard "
            f"file(s) found ({', '.join(p.name for p in optim_files)}): a rank's shard is missing"
        )
    with contextlib.redirect_stdout(io.StringIO()):
        state = _zero12_lazy(tag_dir) if stage <= 2 else None
        info["gather"] = "per parameter, from memory-mapped partitions"
        if state is None:
            info["gather"] = "deepspeed zero_to_fp32 (lazy mode)"
            state = get_fp32_state_dict_from_zero_checkpoint(str(found.root), tag=found.tag, lazy_mode=True)
    return state


def _universal_lazy(zero_dir: Path, model_file: Path) -> dict:
    """Parameters of a universal checkpoint: `zero/<name>/fp32.pt` holds the full fp32 tensor (ZeRO-1/2:
    {'param': tensor, ...}; ZeRO-3: the flat tensor, shaped by the model states' `param_shapes`)."""
    ms = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False)
    groups = ms.get("param_shapes") or []
    shapes = {k: tuple(v) for g in (groups if isinstance(groups, list) else [groups]) for k, v in g.items()}
    state = {}
    for d in sorted(zero_dir.iterdir()):
        f = d / "fp32.pt"
        if f.is_file():
            obj = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
            tensor = obj["param"] if isinstance(obj, dict) else obj
            shape = shapes.get(d.name)
            if shape is not None and tuple(tensor.shape) != shape:
                numel = math.prod(shape)
                if tensor.numel() < numel:
                    raise ConvertError(
                        f"{f}: {tensor.numel()} elements, the parameter has shape {list(shape)}"
                    )
                tensor = tensor.reshape(-1)[:numel].view(shape)
            state[d.name] = tensor
    if not state:
        raise ConvertError(f"{zero_dir} holds no <param>/fp32.pt files")
    return state


def _frozen_zero3(model_files: list[Path], missing: set[str]) -> dict[str, LazyTensor]:
    """Frozen parameters of a ZeRO-3 checkpoint that nothing else provides (a universal copy keeps only the
    trained ones): each rank's model states hold a padded 1/world slice of each, concatenated in rank order."""
    states = [torch.load(f, map_location="cpu", mmap=True, weights_only=False) for f in model_files]
    shapes = states[0].get("frozen_param_shapes") or {}
    out = {}
    for name, shape in shapes.items():
        frags = [st.get("frozen_param_fragments", {}).get(name) for st in states]
        if name not in missing or any(f is None for f in frags):
            continue
        numel = math.prod(shape)

        def load(frags=frags, numel=numel, shape=tuple(shape)):
            return torch.cat([f.reshape(-1) for f in frags])[:numel].view(shape).float()

        out[name] = LazyTensor(tuple(shape), torch.float32, load)
    return out


def _complete(state: dict, model_files: list[Path], info: dict) -> dict[str, LazyTensor]:
    """Lazy tensors of `state`, completed from the module weights of mp_rank_00 and in the module's order."""
    model_file = model_files[0]
    out: dict[str, LazyTensor] = {}
    for name, value in state.items():
        if isinstance(value, LazyTensor):
            out[name] = value
        elif isinstance(value, torch.Tensor):
            out[name] = LazyTensor.of(value)
        else:  # deepspeed's GatheredTensor (ZeRO-3): gathered from every rank's partition on demand
            out[name] = LazyTensor(tuple(value.shape), value.dtype, value.contiguous)

    # ZeRO-1 saves no fragments of frozen parameters (an EMA teacher): they exist only in the module
    # weights of mp_rank_00, in the training dtype. ZeRO-3 leaves empty placeholders there (and saves
    # the fragments, which DeepSpeed already merged above).
    module = torch.load(model_file, map_location="cpu", mmap=True, weights_only=False).get("module") or {}
    extra = {
        k: v for k, v in module.items() if k not in out and isinstance(v, torch.Tensor) and v.numel() > 0
    }
    if extra:
        dtypes = sorted({str(v.dtype).replace("torch.", "") for v in extra.values()})
        info["notes"].append(
            f"{len(extra)} tensors without fp32 master (buffers or frozen parameters, e.g. {next(iter(extra))!r}) "
            f"taken from the module weights of {model_file.name} ({'/'.join(dtypes)}, given as fp32)"
        )
        out.update({k: _as_fp32(v) for k, v in extra.items()})
    missing = {k for k, v in module.items() if k not in out and isinstance(v, torch.Tensor)}
    if missing:
        out.update(_frozen_zero3(model_files, missing))
    order = [k for k in module if k in out]
    return {**{k: out[k] for k in order}, **{k: v for k, v in out.items() if k not in module}}


def to_universal(src: str | Path, dst_tmp: Path, tag: str | None = None, workers: int = 1) -> dict:
    """Write DeepSpeed's universal checkpoint of `src` into the (temporary) directory `dst_tmp`.

    The result is a checkpoint root: `dst_tmp/<tag>/` (per-parameter fp32 weights and Adam moments under
    `zero/`, the model-states files) with `latest` and `latest_universal` naming the tag. A run on any
    number of ranks resumes from it with `"checkpoint": {"load_universal": true}` in its DeepSpeed config.
    """
    from deepspeed.checkpoint import ds_to_universal

    found = resolve_tag(src, tag)
    optim_files = sorted(found.dir.glob(OPTIM_STATES))
    if not optim_files:
        raise ConvertError(
            f"{found.dir} has no ZeRO optimizer shards: a universal checkpoint needs ZeRO 1/2/3"
        )
    stage, world = _zero_info(optim_files[0])
    if world != len(optim_files):
        raise ConvertError(f"{found.dir}: {len(optim_files)} of {world} ranks' optimizer shards present")
    dst_tmp.mkdir(parents=True)
    args = Namespace(
        input_folder=str(found.dir),
        output_folder=str(dst_tmp / found.tag),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            ds_to_universal.main(args)
    except _LOAD_ERRORS as err:
        raise ConvertError(f"universal conversion of {found.dir} failed: {err}") from err
    (dst_tmp / "latest").write_text(found.tag)
    (dst_tmp / "latest_universal").write_text(found.tag)
    # our own per-step files (trainer state, resolved config, meta) travel with the checkpoint
    copied = []
    for f in sorted(found.dir.iterdir()):
        if (
            f.is_file()
            and not f.match(MODEL_STATES)
            and not f.match(OPTIM_STATES)
            and f.name != "zero_to_fp32.py"
        ):
            shutil.copy2(f, dst_tmp / found.tag / f.name)
            copied.append(f.name)
    notes = list(found.notes)
    if copied:
        notes.append(f"copied alongside: {', '.join(copied)}")
    return {"tag": found.tag, "zero_stage": stage, "world_size": world, "notes": notes}


def restore_buffers(module: torch.nn.Module, path: str | Path, tag: str | None = None) -> list[str]:
    """Copy the module buffers (BatchNorm running statistics) saved in a DeepSpeed checkpoint into `module`.

    DeepSpeed 0.19's universal-checkpoint load restores parameters and optimizer state but leaves module
    buffers at their initial values; call this after `engine.load_checkpoint(...)` on a universal
    checkpoint (with `engine.module`). Returns the names of the buffers restored.
    """
    found = resolve_tag(path, tag)
    model_files = sorted(found.dir.glob(MODEL_STATES), key=lambda p: _natural(p.name))
    state = torch.load(model_files[0], map_location="cpu", mmap=True, weights_only=False)
    saved = state.get("module") or {}
    restored = []
    with torch.no_grad():
        for name, buf in module.named_buffers():
            value = saved.get(name)
            if isinstance(value, torch.Tensor) and value.shape == buf.shape:
                buf.copy_(value.to(buf.dtype))
                restored.append(name)
    return restored
