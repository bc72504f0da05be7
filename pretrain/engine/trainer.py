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
import signal
import time
from collections.abc import Callable

import torch

from ..config import ConfigError, RunConfig, dump_config, save_config
from ..data import storage
from ..data.cursor import BatchStream
from ..monitor.panels import DCNProbe, image_grid
from ..monitor.throughput import StepTimer, memory_stats, peak_tflops, train_flops_per_sample
from ..monitor.writer import Monitor
from ..objectives import build_objective
from ..parallel import WeightEMA
from . import dist
from .build import build_model, check_precision_supported, seed_everything, to_device
from .checkpoint import CheckpointManager, resolve_resume, rng_state, set_rng_state
from .ds_config import build_ds_config
from .optim import frozen_parameter_ids, lr_factor, param_groups, peak_lr, set_lr
from .streams import build_default_stream, stream_info

StreamFactory = Callable[[RunConfig, int, int], BatchStream]


class NonFiniteLossError(RuntimeError):
    """Raised after `engine.max_nonfinite` consecutive micro-steps with a NaN/inf loss (a checkpoint is saved)."""


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
        self.stream: BatchStream | None = (
            None  # set by setup(); None until then (teardown after a failed setup)
        )
        self.monitor: Monitor | None = None
        self.probe: DCNProbe | None = None

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
        data_info = {**stream_info(self.stream, cfg), "rank": self.rank, "world_size": self.world}
        objective = self.objective = build_objective(cfg.objective, model, data_info)
        frozen = frozen_parameter_ids(objective)
        for param in objective.parameters():
            if id(param) in frozen:  # EMA teachers: never seen by the optimizer
                param.requires_grad_(False)
        self.image_size = self.stream.image_size  # the stream, not the config: a launcher's stream decides
        self.flops_per_sample = train_flops_per_sample(model, self.image_size)
        groups = param_groups(objective, cfg.optim)

        self.micro_batch = self.stream.batch_size
        self.global_batch = self.micro_batch * cfg.engine.grad_accum * self.world
        self.peak_lr = peak_lr(cfg.optim, self.global_batch)
        # the resume target first: a universal checkpoint needs DeepSpeed's load_universal at initialize time
        try:
            target = self.resume_target = resolve_resume(self.resume, cfg.checkpoint_dir())
        except FileNotFoundError as err:
            raise ConfigError(str(err)) from None
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
            save_config(cfg, storage.join(cfg.output_dir, "config.yaml"))
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
        self.monitor.resume(self.step)  # records of later steps, written before the restart, are replayed
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        try:
            self.stream.load_state_dict(state["stream"])
        except (KeyError, ValueError) as err:  # another corpus order, or another kind of stream
            raise ConfigError(
                f"--resume {root}/{tag}: its data cursor does not fit this run's stream: {err}"
            ) from None
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
        ok = False
        try:  # a setup that fails (a missing corpus, a bad checkpoint) still releases its process group
            self.setup()
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
        """The loop: one optimizer step, then the periodic work, until the end or an agreed stop."""
        self._begin_loop()
        while not self.should_stop():
            self.step_batch()
            self.maybe_log()
            self.maybe_checkpoint()
            self.maybe_evaluate()
        return self.finish()

    def _begin_loop(self) -> None:
        cfg = self.cfg
        self.end = cfg.schedule.total_steps
        if cfg.schedule.stop_at_step is not None:
            self.end = min(self.end, cfg.schedule.stop_at_step)
        self._batches = iter(self.stream)
        self.timer = StepTimer()
        self._sums: dict[str, float] = {}
        self._count = 0
        self._first_batch = True
        self._stop_agreed = False

    def should_stop(self) -> bool:
        """The end of the run, or a stop every rank agreed on (see `_micro_step`): all ranks stop at the same
        step, whichever rank the signal reached, and at whatever moment of the step it arrived."""
        return self.step >= self.end or self._stop_agreed

    def step_batch(self) -> None:
        """One optimizer step: `grad_accum` finite micro-steps, the EMAs, the objective's step-end hook."""
        cfg = self.cfg
        self.lr = self.peak_lr * lr_factor(self.step, cfg.schedule)
        set_lr(self.engine.optimizer, self.lr)
        # rank 0 draws (the offsets are computed inside the forward, so no other rank takes part)
        draw_dcn = self.probe is not None and self.rank == 0 and self.step % cfg.logging.dcn_points_every == 0
        if draw_dcn:
            self.probe.arm()
        done = 0
        step_image = None
        while done < cfg.engine.grad_accum:
            self.timer.data_begin()
            batch = self._next_batch()
            self.timer.data_end()
            if self._first_batch and cfg.logging.image_grid:
                self.monitor.image("inputs/first_batch", image_grid(batch["image"]), self.step)
            self._first_batch = False
            if step_image is None:
                step_image = batch["image"][0]
            done += self._micro_step(batch)
        self.step += 1
        self.timer.step_done(self.micro_batch * cfg.engine.grad_accum)
        if self.ema is not None:
            self.ema.update(self.engine.module)
        self.objective.on_step_end(self.step, cfg.schedule.total_steps)
        if draw_dcn:
            self.monitor.image("dcn/sampling_points", self.probe.render(step_image), self.step)

    def _micro_step(self, batch: dict) -> int:
        """Forward, and backward + step unless some rank's loss is not finite; returns 1 if it trained.

        The one all-reduce of every micro-step also carries the stop flag: a stop requested on any rank, at any
        moment, takes effect on all ranks after the same step (`_stop_agreed`), never on one rank alone.
        """
        out = self.engine(to_device(batch, self.device, self.dtype))
        loss = out["loss"]
        nonfinite, stop = dist.all_reduce_max(
            [float(not torch.isfinite(loss.detach()).item()), float(self._stop_signal is not None)]
        )
        if stop:
            self._stop_agreed = True
            if self._stop_signal is None:
                self._stop_signal = signal.SIGTERM  # another rank got it
        if nonfinite:
            self._skip_nonfinite()
            return 0
        self.consecutive_nonfinite = 0
        self.engine.backward(loss)
        self.engine.step()
        for key, value in out.items():
            value = value.detach().float() if isinstance(value, torch.Tensor) else value
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1
        return 1

    def _skip_nonfinite(self) -> None:
        self.skipped += 1
        self.consecutive_nonfinite += 1
        self.monitor.log(
            f"step {self.step}: non-finite loss on some rank, micro-batch skipped "
            f"({self.consecutive_nonfinite} in a row)"
        )
        if self.consecutive_nonfinite >= self.cfg.engine.max_nonfinite:
            path = self.save_checkpoint()
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive micro-steps had a NaN/inf loss at step "
                f"{self.step}; stopped after saving {path}. Lower optim.lr, check the data "
                "(data/* counters) or switch engine.precision."
            )

    def maybe_log(self) -> None:
        if self.step % self.cfg.logging.every_steps == 0 or self.step == self.end:
            self._log(self._sums, self._count, self.lr, self.timer)
            self._sums, self._count = {}, 0

    def maybe_checkpoint(self) -> None:
        every = self.cfg.checkpoint.every_steps
        if every and self.step % every == 0:
            self.save_checkpoint()

    def maybe_evaluate(self) -> None:
        every = self.cfg.objective.zero_shot.every_steps
        if every and (self.step % every == 0 or self.step == self.end):
            self._zero_shot()

    def finish(self) -> str:
        """Save unless this step is saved already (a stop, `save_final`, or a job that ends before the
        schedule does); returns the reason the loop ended."""
        stopped = self._stop_agreed
        reason = f"signal {signal.Signals(self._stop_signal).name}" if stopped else "finished"
        if self.saved_step != self.step and (
            stopped or self.cfg.checkpoint.save_final or self.step < self.cfg.schedule.total_steps
        ):
            self.save_checkpoint()
        self.monitor.log(f"stopped at step {self.step} ({reason}); checkpoint {self.last_checkpoint}")
        return reason

    def _next_batch(self) -> dict:
        """The next batch; a finite stream (one epoch per iteration) is iterated again for the next epoch."""
        try:
            return next(self._batches)
        except StopIteration:
            self._batches = iter(self.stream)
            try:
                return next(self._batches)
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
                prepare=lambda batch: to_device(batch, self.device, self.dtype),
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
        c = self.stream.counters()
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
        self.monitor.flush()  # logs on disk (and at a remote output_dir) as far as the checkpoint
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, self.step)
        return path

    def teardown(self, clean: bool = True) -> None:
        self._restore_signal_handlers()
        if self.probe is not None:
            self.probe.remove()
        if self.monitor is not None:
            self.monitor.close()
        if self.stream is not None:
            self.stream.close()
        if self._owns_process_group:
            import torch.distributed as tdist

            if tdist.is_initialized():
                if clean:  # after an error other ranks may never arrive
                    tdist.barrier()
                tdist.destroy_process_group()
