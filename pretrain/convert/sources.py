"""Open any supported checkpoint as lazy tensors: DeepSpeed directories, torch files, safetensors, HF dirs.

Format detection:
- a directory with `config.json` whose `model_type` is `intern_image` → the HF port layout;
- a directory with `config.json` + `model.safetensors` → our safetensors layout;
- a directory with DeepSpeed model states (`latest`, `global_stepN/`, `*model_states.pt`) → DeepSpeed;
- `*.safetensors` → safetensors (the variant record is in its metadata);
- any other file → a torch file: `{'model': ...}` is the official release format, `{'module': ...}` /
  `{'state_dict': ...}` / a flat dict of tensors is a consolidated state dict.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .tensors import ST_DTYPES_INV, ConvertError, LazyTensor
from .zero import is_deepspeed_dir, read_deepspeed

RECORD_KEY = "internimage_pretrain"  # where our variant record lives (pth key, safetensors metadata, config)
ST_WEIGHTS = "model.safetensors"
HF_MODEL_TYPE = "intern_image"


@dataclass
class Source:
    """An opened checkpoint: lazy tensors in the file's own key scheme plus what is known about it."""

    path: Path
    format: str  # deepspeed | official | consolidated | safetensors | hf
    tensors: dict[str, LazyTensor]
    record: dict | None = None  # {"variant": ..., "kwargs": {...}} when the file says what model it is
    info: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _load_torch(path: Path, allow_pickle: bool) -> object:
    """torch.load memory-mapped (nothing is read until used) and weights-only unless allowed otherwise."""
    try:
        try:
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) serialization cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not allow_pickle:
            raise ConvertError(
                f"{path} holds Python objects besides tensors (e.g. a training config); refusing to unpickle "
                f"an untrusted file. If you trust it, pass --allow-pickle (allow_pickle=True). Detail: "
                f"{str(err).splitlines()[0]}"
            ) from err
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ConvertError(f"{path} ({size} bytes) is truncated or not a torch checkpoint: {err}") from err


def _tensors_of(state: dict, path: Path, notes: list[str]) -> dict[str, LazyTensor]:
    out = {}
    skipped = []
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = LazyTensor.of(value)
        else:
            skipped.append(key)
    if skipped:
        notes.append(f"ignored {len(skipped)} non-tensor entries (e.g. {skipped[0]!r})")
    if not out:
        raise ConvertError(f"{path} contains no tensors")
    return out


def read_torch_file(path: Path, allow_pickle: bool = False) -> Source:
    obj = _load_torch(path, allow_pickle)
    notes: list[str] = []
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("model"), dict):
        extra = sorted(k for k in obj if k not in ("model", RECORD_KEY))
        if extra:
            notes.append(f"official-format file also holds {extra}: ignored (weights only)")
        return Source(
            path, "official", _tensors_of(obj["model"], path, notes), obj.get(RECORD_KEY), notes=notes
        )
    for key in ("module", "state_dict"):
        if isinstance(obj.get(key), dict):
            notes.append(f"weights taken from the file's {key!r} entry")
            return Source(path, "consolidated", _tensors_of(obj[key], path, notes), notes=notes)
    return Source(path, "consolidated", _tensors_of(obj, path, notes), notes=notes)


def read_safetensors(path: Path) -> Source:
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        metadata = handle.metadata() or {}
        tensors = {}
        for key in handle.keys():
            sl = handle.get_slice(key)
            dtype = ST_DTYPES_INV.get(sl.get_dtype())
            if dtype is None:
                raise ConvertError(f"{path}: tensor {key!r} has unsupported dtype {sl.get_dtype()}")
            tensors[key] = LazyTensor(tuple(sl.get_shape()), dtype, lambda k=key: handle.get_tensor(k))
    except (SafetensorError, OSError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        raise ConvertError(f"{path} ({size} bytes) is truncated or not a safetensors file: {err}") from err
    if not tensors:
        raise ConvertError(f"{path} contains no tensors")
    record = json.loads(metadata[RECORD_KEY]) if RECORD_KEY in metadata else None
    return Source(path, "safetensors", tensors, record)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConvertError(f"{path} is not readable JSON: {err}") from err


def open_source(path: str | Path, *, tag: str | None = None, allow_pickle: bool = False) -> Source:
    """Open `path` in whatever supported format it is (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_dir():
        config_path = path / "config.json"
        if config_path.is_file():
            config = _read_config(config_path)
            if (path / ST_WEIGHTS).is_file():
                src = read_safetensors(path / ST_WEIGHTS)
            elif (path / "pytorch_model.bin").is_file():
                src = read_torch_file(path / "pytorch_model.bin", allow_pickle)
            else:
                raise ConvertError(f"{path} has a config.json but no {ST_WEIGHTS} or pytorch_model.bin")
            src.path = path
            src.record = config.get(RECORD_KEY, src.record)
            if config.get("model_type") == HF_MODEL_TYPE:
                src.format = "hf"
                if src.record is None:  # a released HF port: its config holds the constructor keywords
                    src.record = {"variant": None, "kwargs": _hf_kwargs(config)}
            else:
                src.format = "safetensors"
            return src
        if is_deepspeed_dir(path):
            tensors, info = read_deepspeed(path, tag)
            record = run_config_record(Path(info["dir"]))
            return Source(path, "deepspeed", tensors, record, info=info, notes=info.pop("notes"))
        raise ConvertError(
            f"{path} is a directory but neither a DeepSpeed checkpoint (no 'latest', no global_step*/ with "
            "*model_states.pt) nor an HF/safetensors directory (no config.json)"
        )
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path, allow_pickle)


def run_config_record(tag_dir: Path) -> dict | None:
    """The model record from the resolved run config our engine saves next to DeepSpeed's files."""
    path = tag_dir / "config.yaml"
    if not path.is_file():
        return None
    import yaml

    from .spec import record_from_variant

    try:
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    except yaml.YAMLError:
        return None
    if not isinstance(model, dict) or not model.get("variant"):
        return None
    return record_from_variant(model["variant"], None, dict(model.get("overrides") or {}))


def _hf_kwargs(config: dict) -> dict:
    """InternImage constructor keywords from an HF-port config.json (it stores them under their own names)."""
    from .spec import RUNTIME_OPTIONS, constructor_keys

    keys = constructor_keys() - set(RUNTIME_OPTIONS)
    return {k: v for k, v in config.items() if k in keys}
