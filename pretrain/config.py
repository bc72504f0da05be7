"""The one typed run configuration: YAML -> frozen dataclasses, with a doc and an allowed range per field.

    cfg = load_config("configs/tiny_cpu.yaml", overrides=["optim.lr=1e-3", "engine.zero_stage=2"])
    save_config(cfg, "runs/x/config.yaml")          # the resolved config, saved with every run/checkpoint

Every section of every package (this file, `pretrain.data.config`, `pretrain.objectives.config`) follows one
convention, `pretrain.fields`: a frozen dataclass deriving `Section`, each field `field(default, "doc",
ge=/gt=/le=/lt=/choices=)`, cross-field rules in `validate()`. `describe()` (`pretrain train
--describe-config`) prints every key from that metadata. Loading is strict and has one checker: an unknown key
fails naming its dotted path and the closest valid key (difflib), a value of the wrong type (`_coerce`) or out
of its range (the section's own check) fails naming the dotted key. Every failure is a `ConfigError`, one line.
Nothing mutates a config after load; components receive only their own section.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# The data and objective sections are owned by their packages; each component receives only its own section.
from pretrain.data.config import DataConfig
from pretrain.fields import ConfigError, FieldError, Section
from pretrain.fields import field as _f
from pretrain.objectives.config import ObjectiveConfig

__all__ = ["ConfigError", "RunConfig", "describe", "dump_config", "load_config", "save_config"]

# the DCNv3 op backends registered in pretrain.ops (a test keeps the two lists equal)
DCN_BACKENDS = ("auto", "reference", "cuda", "cuda-emu")


# ---------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class ModelConfig(Section):
    """Which backbone to build (`pretrain.models.create_model`) and how to initialise it."""

    variant: str = _f(
        "internimage_t", "Registered variant: internimage_t|s|b|l|xl|h|g (see `pretrain models`)."
    )
    num_classes: int = _f(1000, "Classifier classes (0 = no classifier head).", ge=0)
    dcn_backend: str = _f(
        "auto",
        "DCNv3 op backend: auto (fastest available), reference, or a fused kernel.",
        choices=DCN_BACKENDS,
    )
    with_cp: bool = _f(
        False,
        "Activation checkpointing of every block (the official `with_cp`): ~30% slower, "
        "a fraction of the activation memory.",
    )
    drop_path_rate: float | None = _f(
        None, "Stochastic depth rate; null keeps the variant's default.", ge=0, lt=1
    )
    overrides: dict[str, Any] = _f(
        {},
        "Extra constructor arguments (channels, depths, groups, ...) for custom "
        "sizes; passed to create_model as keywords.",
    )
    init_from: str | None = _f(
        None,
        "Initial weights: an official .pth, an HF directory or a .safetensors "
        "file (loaded through pretrain.convert.load_pretrained); null = random init.",
    )
    init_drop_head: bool = _f(False, "Do not load the classifier from init_from (another label set).")


@dataclass(frozen=True)
class SyntheticConfig(Section):
    """A deterministic synthetic stream (class-coloured noise) instead of the corpus: smoke tests, benchmarks."""

    enabled: bool = _f(False, "Use the synthetic stream instead of `data`.")
    batch_size: int = _f(8, "Images per rank per micro-step.", ge=1)
    image_size: int = _f(224, "Square input resolution in pixels.", ge=1)
    num_classes: int | None = _f(
        None, "Labels are drawn from [0, num_classes); null = model.num_classes.", ge=1
    )


@dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW with the official InternImage parameter groups."""

    name: Literal["adamw"] = _f("adamw", "Optimizer (AdamW only).")
    lr: float = _f(
        5e-4, "Peak learning rate for a global batch of `lr_ref_batch` (linear scaling rule).", gt=0
    )
    lr_ref_batch: int | None = _f(
        512,
        "Global batch `lr` refers to: effective lr = lr * global_batch / "
        "lr_ref_batch (official: 512). null = `lr` is absolute.",
        ge=1,
    )
    weight_decay: float = _f(
        0.05, "Decoupled weight decay; not applied to 1-D params, biases and norms.", ge=0
    )
    betas: tuple[float, float] = _f((0.9, 0.999), "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.", gt=0)
    layer_decay: float = _f(
        1.0,
        "Layer-wise lr decay ratio with the official semantics (pretrain.models.lr_decay_ratios); 1.0 = off.",
        gt=0,
        le=1,
    )
    dcn_lr_mul: float = _f(
        1.0, "lr multiplier of the DCN offset/mask projections (official DCN_LR_MUL).", ge=0
    )

    def validate(self) -> None:
        if not all(0 <= b < 1 for b in self.betas):
            raise FieldError("betas", f"each must be in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """Per-step lr schedule: linear warmup, then cosine to `min_lr_ratio`."""

    total_steps: int = _f(1000, "Optimizer steps of the whole run (the cosine reaches its end here).", ge=1)
    warmup_steps: int = _f(0, "Linear warmup steps.", ge=0)
    warmup_init_ratio: float = _f(
        0.0, "Warmup starts at lr * this (official: WARMUP_LR / BASE_LR = 1e-3).", ge=0, le=1
    )
    min_lr_ratio: float = _f(0.0, "Cosine ends at lr * this (official: MIN_LR / BASE_LR = 1e-2).", ge=0, le=1)
    stop_at_step: int | None = _f(
        None,
        "Stop this job at this step (saving a checkpoint) while the schedule "
        "still spans total_steps: for runs split over time-limited jobs.",
        ge=1,
    )


@dataclass(frozen=True)
class EngineConfig(Section):
    """DeepSpeed: precision, ZeRO, accumulation, clipping, and the non-finite loss guard."""

    precision: Literal["bf16", "fp16", "fp32"] = _f("bf16", "Training precision (master weights stay fp32).")
    zero_stage: int = _f(
        1, "ZeRO stage 0-3: 1 shards optimizer state, 2 also gradients, 3 also parameters.", ge=0, le=3
    )
    offload_optimizer: bool = _f(
        False, "ZeRO-Offload of optimizer state to CPU (stage >= 1; builds CPUAdam)."
    )
    offload_param: bool = _f(False, "Offload parameters to CPU (stage 3 only).")
    grad_accum: int = _f(1, "Micro-steps accumulated per optimizer step.", ge=1)
    clip_grad: float | None = _f(5.0, "Global gradient-norm clip (official CLIP_GRAD 5.0); null = off.", gt=0)
    max_nonfinite: int = _f(
        10,
        "Stop with an error (after saving) once this many micro-steps in a row had "
        "a NaN/inf loss; each such micro-step is skipped (no backward) and counted.",
        ge=1,
    )
    dist_backend: Literal["auto", "nccl", "gloo"] = _f(
        "auto", "Process-group backend: auto = nccl on CUDA, gloo on CPU."
    )
    deepspeed_config: str | None = _f(
        None,
        "A raw DeepSpeed JSON whose keys are merged over the generated "
        "config (recursively): the escape hatch for tuning knobs.",
    )

    def validate(self) -> None:
        if self.offload_param and self.zero_stage != 3:
            raise FieldError("offload_param", f"needs engine.zero_stage=3, got zero_stage={self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise FieldError("offload_optimizer", "needs engine.zero_stage >= 1")


@dataclass(frozen=True)
class EMAConfig(Section):
    """Exponential moving average of the trained weights (the official classification EMA)."""

    enabled: bool = _f(False, "Keep an EMA of the weights (fp32, this rank's shard under ZeRO-3).")
    decay: float = _f(0.9999, "EMA decay per optimizer step (official 0.9999).", ge=0, le=1)


@dataclass(frozen=True)
class CheckpointConfig(Section):
    """One directory per step (DeepSpeed shards + our state), a `latest` pointer, the last K kept."""

    dir: str | None = _f(None, "Checkpoint root (local path or fsspec URL); null = <output_dir>/checkpoints.")
    every_steps: int = _f(1000, "Save every N optimizer steps (0 = only at the end / on signal).", ge=0)
    keep: int = _f(3, "Keep the last K step directories (0 = keep all).", ge=0)
    save_on_signal: bool = _f(True, "On SIGTERM/SIGINT finish the step, save, and exit.")
    save_final: bool = _f(True, "Save when the run ends.")


@dataclass(frozen=True)
class LoggingConfig(Section):
    """TensorBoard and the console progress line."""

    every_steps: int = _f(10, "Log scalars and print the progress line every N optimizer steps.", ge=1)
    tensorboard: bool = _f(True, "Write TensorBoard events under <output_dir>/tb (rank 0).")
    console: bool = _f(True, "Print the progress line (rank 0).")
    image_grid: bool = _f(True, "Log an image grid of the first batch.")
    dcn_points_every: int = _f(
        1000, "Draw learned DCN sampling points over an input image every N steps (0 = never).", ge=0
    )
    peak_tflops: float | None = _f(
        None,
        "Peak dense TFLOP/s per device for MFU; null = look the device up in "
        "pretrain.monitor.throughput.PEAK_TFLOPS.",
        gt=0,
    )


@dataclass(frozen=True)
class RunConfig(Section):
    """A whole training run."""

    name: str = _f("run", "Run name (TensorBoard and log labels).")
    output_dir: str = _f("runs/run", "Where the resolved config, metrics.jsonl, tb/ and checkpoints/ go.")
    seed: int = _f(0, "Global seed (model init is identical on every rank; data and dropout are per rank).")
    model: ModelConfig = _f(ModelConfig(), "Backbone.")
    data: DataConfig = _f(DataConfig(), "Corpus stream (pretrain.data).")
    synthetic: SyntheticConfig = _f(SyntheticConfig(), "Synthetic stream instead of the corpus.")
    objective: ObjectiveConfig = _f(ObjectiveConfig(), "Objective (pretrain.objectives).")
    optim: OptimConfig = _f(OptimConfig(), "Optimizer.")
    schedule: ScheduleConfig = _f(ScheduleConfig(), "Learning-rate schedule and run length.")
    engine: EngineConfig = _f(EngineConfig(), "DeepSpeed engine.")
    ema: EMAConfig = _f(EMAConfig(), "Weight EMA.")
    checkpoint: CheckpointConfig = _f(CheckpointConfig(), "Checkpointing.")
    logging: LoggingConfig = _f(LoggingConfig(), "Logging.")

    def checkpoint_dir(self) -> str:
        """`checkpoint.dir`, or `<output_dir>/checkpoints` joined as a string (an fsspec URL stays one)."""
        return self.checkpoint.dir or f"{self.output_dir.rstrip('/')}/checkpoints"


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


def _schema_at(cls: Any, parts: list[str], key: str) -> None:
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


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], schema: type = RunConfig) -> dict:
    """`a.b=value` strings into a copy of the raw mapping; values are parsed as YAML (typed)."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        _schema_at(schema, parts, key)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: {text!r} is not a valid YAML value ({err.problem})") from None
        node = out
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def add_config_arguments(
    parser, *, required: bool = True, config_help: str = "YAML run config (see configs/)"
) -> None:
    """`--config/-c PATH` and repeatable `--set KEY=VALUE` (parsed as YAML), shared by every command that loads
    a run config (`pretrain train`, `pretrain eval`, the Ray job): `load_config(args.config, args.overrides)`."""
    parser.add_argument("--config", "-c", required=required, help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config key, e.g. --set optim.lr=1e-3 --set engine.zero_stage=3 (repeatable)",
    )


def _read_yaml(path: str | Path) -> dict:
    """The top-level mapping of a YAML config file; every problem is a ConfigError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {path} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {path} is not a file (a directory?)")
    try:
        raw = yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        where = ""
        mark = getattr(err, "problem_mark", None)
        if mark is not None:
            where = f" line {mark.line + 1}, column {mark.column + 1}:"
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where} not valid YAML ({problem})") from None
    if raw is None:
        raise ConfigError(f"{path} is empty: a run config names at least its model and data (see configs/)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) + `--set` overrides -> a validated, frozen RunConfig."""
    raw = _read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, list(overrides))
    return from_dict(RunConfig, raw)


def config_from_yaml_text(text: str) -> RunConfig:
    return from_dict(RunConfig, yaml.safe_load(text) or {})


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, url: str) -> None:
    """Write the resolved config atomically to a local path or any fsspec URL."""
    from pretrain.data import storage

    storage.write_bytes_atomic(str(url), dump_config(cfg).encode())


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
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
