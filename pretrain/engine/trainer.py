"""The trainer: build everything in order, then a short loop. It does not know which launcher started it.

    Trainer(config).fit()                      # one process (CPU/gloo or one GPU), or under `deepspeed`
    Trainer(config, stream_factory=f).fit()    # a launcher (Ray Train) hands over the data stream

`fit()` joins the existing process group or creates one (a world of one without a launcher). Checkpoints go to
`config.checkpoint_dir()` (any local path or fsspec URL); `save_checkpoint()` is public so a launcher can
report checkpoints (Ray) and `resume=` takes "auto" or a path.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..config import RunConfig, dump_config, save_config
from ..monitor.panels import DCNProbe, image_grid
from ..monitor.throughput import StepTimer, memory_stats, peak_tflops, train_flops_per_sample
from ..monitor.writer import Monitor
from ..parallel import WeightEMA
from . import dist
from .checkpoint import CheckpointManager, resolve_resume, rng_state, set_rng_state
from .ds_config import build_ds_config
from .optim import frozen_parameter_ids, lr_factor, param_groups, peak_lr, set_lr
from .streams import build_default_stream, image_size, micro_batch_size, stream_info

StreamFactory = Callable[[RunConfig, int, int], object]


class NonFiniteLossError(RuntimeError):
    """Raised after `engine.max_nonfinite` consecutive micro-steps with a NaN/inf loss (a checkpoint is saved)."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: RunConfig):
    """The backbone named by `model` (and its initial weights)."""
    from pretrain.models import create_model

    m = cfg.model
    kwargs = dict(m.overrides)
    kwargs.update(num_classes=m.num_classes, dcn_backend=m.dcn_backend, with_cp=m.with_cp)
    if m.drop_path_rate is not None:
        kwargs["drop_path_rate"] = m.drop_path_rate
    model = create_model(m.variant, **kwargs)
    if m.init_from:
        from pretrain.convert import load_pretrained

        load_pretrained(m.init_from, model, strict=True, drop_head=m.init_drop_head)
    return model


def build_objective(cfg: RunConfig, model, data_info: dict):
    from pretrain.objectives import build_objective as build

    return build(cfg.objective, model, data_info)


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Tensors to the device; images (4-D floats) to the engine's compute dtype, other floats untouched."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point() and value.dim() == 4:
                value = value.to(dtype)
        out[key] = value
    return out


def check_precision_supported(precision: str) -> None:
    """Fail before any work with a config error, not deep inside deepspeed.initialize, when the device cannot
    run the precision (DeepSpeed's CPU accelerator has bf16 and fp32 but no fp16)."""
    if precision != "fp16":
        return
    from deepspeed.accelerator import get_accelerator

    from ..config import ConfigError

    accelerator = get_accelerator()
    if not accelerator.is_fp16_supported():
        raise ConfigError(
            f"engine.precision=fp16 is not supported by DeepSpeed's {accelerator.device_name()!r} accelerator "
            "(fp16 with loss scaling needs a GPU): use engine.precision=bf16 or fp32"
        )


class Trainer:
    """See the module docstring. Attributes after `setup()`: engine, stream, monitor, step."""

    def __init__(
        self,
        config: RunConfig,
        stream_factory: StreamFactory | None = None,
        resume: str | None = None,
        on_checkpoint: Callable[[str, int], None] | None = None,
    ):
        """`stream_factory(config, rank, world_size)` replaces the config's stream (a launcher's data);
        `resume` is "auto", a checkpoint path or None; `on_checkpoint(path, step)` runs on every rank after
        each complete save (e.g. Ray Train's report)."""
        self.cfg = config
        self.on_checkpoint = on_checkpoint
        self.stream_factory = stream_factory or build_default_stream
        self.resume = resume
        self.step = 0
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self._stop_signal: int | None = None
        self._old_handlers: dict = {}
        self._owns_process_group = False
        self.history: list[dict] = []
        self.last_checkpoint: str | None = None
        self.saved_step: int | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        import torch.distributed as tdist

        check_precision_supported(cfg.engine.precision)

        self._owns_process_group = not (tdist.is_available() and tdist.is_initialized())
        dist.ensure_process_group(cfg.engine.dist_backend)
        self.rank, self.world = dist.rank(), dist.world_size()
        self.device = dist.device()
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            cfg.engine.precision
        ]

        seed_everything(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        self.stream = self.stream_factory(cfg, self.rank, self.world)
        objective = self.objective = build_objective(
            cfg, model, {**stream_info(self.stream, cfg), "rank": self.rank}
        )
        frozen = frozen_parameter_ids(objective)
        for param in objective.parameters():
            if id(param) in frozen:  # EMA teachers: never seen by the optimizer
                param.requires_grad_(False)
        self.image_size = image_size(cfg)
        self.flops_per_sample = train_flops_per_sample(model, self.image_size)
        groups = param_groups(objective, cfg.optim)

        self.micro_batch = micro_batch_size(cfg)
        self.global_batch = self.micro_batch * cfg.engine.grad_accum * self.world
        self.peak_lr = peak_lr(cfg.optim, self.global_batch)
        # the resume target first: a universal checkpoint needs DeepSpeed's load_universal at initialize time
        target = self.resume_target = resolve_resume(self.resume, cfg.checkpoint_dir())
        universal = target is not None and CheckpointManager(target[0]).is_universal(target[1])
        self.ds_config = build_ds_config(
            cfg, self.micro_batch, self.world, self.peak_lr, load_universal=universal
        )
        if self.dtype != torch.float32:
            # DeepSpeed casts parameters, not buffers: BatchNorm running stats must match the compute dtype.
            for buf in objective.buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(self.dtype)
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(
            model=objective, model_parameters=groups, config=self.ds_config
        )
        self.zero3 = self.engine.zero_optimization_stage() == 3
        seed_everything(cfg.seed * 1000 + self.rank)  # dropout/drop-path streams differ per rank

        self.ema = WeightEMA(self.engine.module, cfg.ema.decay) if cfg.ema.enabled else None
        self.checkpoints = CheckpointManager(cfg.checkpoint_dir(), keep=cfg.checkpoint.keep)
        self.monitor = Monitor(
            cfg.output_dir,
            enabled=self.rank == 0,
            tensorboard=cfg.logging.tensorboard,
            console=cfg.logging.console,
            total_steps=cfg.schedule.total_steps,
            run_name=cfg.name,
        )
        self.probe = None
        if cfg.logging.dcn_points_every > 0:
            try:
                self.probe = DCNProbe(model)
            except ValueError as err:  # a backbone without DCNv3 modules: nothing to draw
                self.monitor.log(f"no DCN sampling-point panels: {err}")
        self.peak = cfg.logging.peak_tflops or peak_tflops(precision=cfg.engine.precision)

        if self.resume_target is not None:
            self._restore(*self.resume_target)
        if self.rank == 0:
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
            self.monitor.text("config", "```\n" + dump_config(cfg) + "\n```", self.step)
        self._install_signal_handlers()
        self.monitor.log(
            f"world {self.world} | ZeRO-{self.engine.zero_optimization_stage()} | {cfg.engine.precision} | "
            f"micro-batch {self.micro_batch} x accum {cfg.engine.grad_accum} x {self.world} = {self.global_batch} | "
            f"peak lr {self.peak_lr:.3e} | params {sum(getattr(p, 'ds_numel', p.numel()) for p in objective.parameters()):,} | "
            f"starting at step {self.step}"
        )

    def _restore(self, root: str, tag: str) -> None:
        manager = (
            self.checkpoints
            if root.rstrip("/") == self.cfg.checkpoint_dir().rstrip("/")
            else CheckpointManager(root)
        )
        state = manager.load(self.engine, tag)
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self.stream.load_state_dict(state["stream"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        warning = self.objective.load_rank_state(state.get("objective", {}))
        if warning:
            self.monitor.log(f"warning: {warning}")
        set_rng_state(state["rng"])
        self.monitor.log(f"resumed from {root}/{tag} at step {self.step}")

    # ------------------------------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if not self.cfg.checkpoint.save_on_signal:
            return

        def handler(signum, frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[sig] = signal.signal(sig, handler)
            except ValueError:
                return  # not the main thread (e.g. a Ray Train worker): the launcher handles signals

    def request_stop(self) -> None:
        """Take the stop-on-signal path (finish the step on every rank, save, return) from any thread.

        The SIGTERM handler is installed only in the main thread; launchers that run this loop elsewhere
        (a Ray Train worker) call this instead when their own stop signal arrives.
        """
        self._stop_signal = signal.SIGTERM

    def _restore_signal_handlers(self) -> None:
        for sig, old in self._old_handlers.items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)
        self._old_handlers.clear()

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train until schedule.total_steps (or stop_at_step, or a signal). Returns a summary dict."""
        self.setup()
        ok = False
        try:
            reason = self.train()
            ok = True
        finally:
            self.teardown(clean=ok)
        return {
            "step": self.step,
            "reason": reason,
            "checkpoint": self.last_checkpoint,
            "history": self.history,
            "skipped": self.skipped,
        }

    def train(self) -> str:
        cfg = self.cfg
        end = cfg.schedule.total_steps
        if cfg.schedule.stop_at_step is not None:
            end = min(end, cfg.schedule.stop_at_step)
        it = iter(self.stream)
        timer = StepTimer()
        sums: dict[str, float] = {}
        count = 0
        first = True
        reason = "finished"
        while self.step < end:
            lr = self.peak_lr * lr_factor(self.step, cfg.schedule)
            set_lr(self.engine.optimizer, lr)
            # rank 0 draws (the offsets are computed inside the forward, so no other rank takes part)
            draw_dcn = (
                self.probe is not None and self.rank == 0 and self.step % cfg.logging.dcn_points_every == 0
            )
            if draw_dcn:
                self.probe.arm()
            done = 0
            step_image = None
            while done < cfg.engine.grad_accum:
                timer.data_begin()
                batch, it = self._next_batch(it)
                timer.data_end()
                if first and cfg.logging.image_grid:
                    self.monitor.image("inputs/first_batch", image_grid(batch["image"]), self.step)
                    first = False
                if step_image is None:
                    step_image = batch["image"][0]
                out = self.engine(_to_device(batch, self.device, self.dtype))
                loss = out["loss"]
                nonfinite, stop = dist.all_reduce_max(
                    [float(not torch.isfinite(loss.detach()).item()), float(self._stop_signal is not None)]
                )
                if stop and self._stop_signal is None:
                    self._stop_signal = signal.SIGTERM  # another rank got it
                if nonfinite:
                    self.skipped += 1
                    self.consecutive_nonfinite += 1
                    self.monitor.log(
                        f"step {self.step}: non-finite loss on some rank, micro-batch skipped "
                        f"({self.consecutive_nonfinite} in a row)"
                    )
                    if self.consecutive_nonfinite >= cfg.engine.max_nonfinite:
                        path = self.save_checkpoint()
                        raise NonFiniteLossError(
                            f"{self.consecutive_nonfinite} consecutive micro-steps had a NaN/inf loss at step "
                            f"{self.step}; stopped after saving {path}. Lower optim.lr, check the data "
                            "(data/* counters) or switch engine.precision."
                        )
                    continue
                self.consecutive_nonfinite = 0
                self.engine.backward(loss)
                self.engine.step()
                done += 1
                for key, value in out.items():
                    value = value.detach().float() if isinstance(value, torch.Tensor) else value
                    sums[key] = sums.get(key, 0.0) + float(value)
                count += 1
            self.step += 1
            timer.step_done(self.micro_batch * cfg.engine.grad_accum)
            if self.ema is not None:
                self.ema.update(self.engine.module)
            self.objective.on_step_end(self.step, cfg.schedule.total_steps)
            if draw_dcn:
                self.monitor.image("dcn/sampling_points", self.probe.render(step_image), self.step)
            if self.step % cfg.logging.every_steps == 0 or self.step == end:
                self._log(sums, count, lr, timer)
                sums, count = {}, 0
            if cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0:
                self.save_checkpoint()
            zero_shot_every = cfg.objective.zero_shot.every_steps
            if zero_shot_every and (self.step % zero_shot_every == 0 or self.step == end):
                self._zero_shot()
            if self._stop_signal is not None:
                reason = f"signal {signal.Signals(self._stop_signal).name}"
                break
        if self.saved_step != self.step and (
            self._stop_signal is not None or cfg.checkpoint.save_final or self.step < cfg.schedule.total_steps
        ):
            self.save_checkpoint()
        self.monitor.log(f"stopped at step {self.step} ({reason}); checkpoint {self.last_checkpoint}")
        return reason

    def _next_batch(self, it):
        """The next batch; a finite stream (one epoch per iteration) is iterated again for the next epoch."""
        try:
            return next(it), it
        except StopIteration:
            it = iter(self.stream)
            try:
                return next(it), it
            except StopIteration:
                raise RuntimeError("the data stream is empty (a fresh epoch yielded no batch)") from None

    def _zero_shot(self) -> None:
        """Zero-shot evaluation on the held-out split (every rank takes part; rank 0 logs and prints)."""
        from ..objectives.evaluation import zero_shot

        with torch.no_grad():
            metrics = zero_shot(
                self.objective,
                self.cfg,
                rank=self.rank,
                world_size=self.world,
                prepare=lambda batch: _to_device(batch, self.device, self.dtype),
            )
        if metrics:
            metrics = {k: float(v) for k, v in metrics.items()}
            self.monitor.scalars(self.step, metrics)
            self.monitor.log(
                f"step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))
            )

    def _log(self, sums: dict, count: int, lr: float, timer: StepTimer) -> None:
        keys = sorted(sums)
        means = dist.all_reduce_mean([sums[k] / max(count, 1) for k in keys]) if keys else []
        values = {f"loss/{k}": v for k, v in zip(keys, means)}
        win = timer.window()
        grad_norm = self.engine.get_global_grad_norm()
        if isinstance(grad_norm, torch.Tensor):
            grad_norm = float(grad_norm)
        loss_scale = getattr(self.engine.optimizer, "cur_scale", None)
        if loss_scale is None:
            loss_scale = getattr(self.engine.optimizer, "loss_scale", 1.0)
        group = self.engine.optimizer.param_groups[0]
        lr = group["lr"] / group.get("lr_scale", 1.0)  # what the optimizer really used (base, before scaling)
        values.update(
            {
                "opt/lr": lr,
                "opt/grad_norm": grad_norm if grad_norm is not None and math.isfinite(grad_norm) else None,
                "opt/loss_scale": float(loss_scale)
                if isinstance(loss_scale, (int, float, torch.Tensor))
                else 1.0,
                "perf/step_time_s": win["step_time_s"],
                "perf/samples_per_s_per_device": win["samples_per_s"],
                "perf/samples_per_s": win["samples_per_s"] * self.world,
                "perf/data_wait_frac": win["data_wait_frac"],
                "train/skipped_steps": float(self.skipped),
            }
        )
        if self.flops_per_sample:
            tflops = self.flops_per_sample * win["samples_per_s"] / 1e12
            values["perf/tflops_per_device"] = tflops
            if self.peak:
                values["perf/mfu"] = tflops / self.peak
        values.update(memory_stats())
        counters = getattr(self.stream, "counters", None)
        if callable(counters):
            c = counters() or {}
            keys = sorted(c)
            totals = dist.all_reduce_mean([float(c[k]) for k in keys]) if keys else []
            values.update({f"data/{k}": v * self.world for k, v in zip(keys, totals)})
        self.history.append({"step": self.step, **values})
        self.monitor.scalars(self.step, values)
        self.monitor.progress(self.step, values)

    # ------------------------------------------------------------------------------------------ state
    def trainer_state(self) -> dict:
        """This rank's non-DeepSpeed state: step, data cursor, RNG states, EMA shard, counters."""
        return {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "rng": rng_state(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "objective": self.objective.rank_state(),
            "skipped": self.skipped,
            "consecutive_nonfinite": self.consecutive_nonfinite,
        }

    def save_checkpoint(self) -> str:
        """Save a complete checkpoint of the current step (collective); returns its directory URL."""
        t0 = time.perf_counter()
        path = self.checkpoints.save(self.engine, self.step, self.trainer_state(), dump_config(self.cfg))
        self.last_checkpoint, self.saved_step = path, self.step
        self.monitor.log(f"saved {path} in {time.perf_counter() - t0:.1f}s")
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, self.step)
        return path

    def teardown(self, clean: bool = True) -> None:
        self._restore_signal_handlers()
        if getattr(self, "probe", None) is not None:
            self.probe.remove()
        if getattr(self, "monitor", None) is not None:
            self.monitor.close()
        close = getattr(getattr(self, "stream", None), "close", None)
        if callable(close):
            close()
        if self._owns_process_group:
            import torch.distributed as tdist

            if tdist.is_initialized():
                if clean:  # after an error other ranks may never arrive
                    tdist.barrier()
                tdist.destroy_process_group()
