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

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

# The data and objective sections are owned by their packages; each component receives only its own section.
from pretrain import fields
from pretrain.data.config import DataConfig
from pretrain.fields import ConfigError, FieldError, Section, from_dict, schema_at, to_dict
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
def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], schema: type = RunConfig) -> dict:
    """`a.b=value` strings into a copy of the raw mapping; values are parsed as YAML (typed)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        schema_at(schema, parts, key)
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
    """One line per key of the run config (`pretrain train --describe-config`); see `pretrain.fields.describe`."""
    return fields.describe(cls, prefix)
