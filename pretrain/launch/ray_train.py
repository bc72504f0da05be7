"""The Ray Train side of the driver: the `TorchTrainer` of a `JobPlan` and the stop flag its workers poll."""

from __future__ import annotations

import os

from .preflight import JobPlan


def stop_flag_class():
    import ray

    @ray.remote(num_cpus=0)
    class StopFlag:
        """Set by the driver on SIGTERM/SIGINT; polled by every worker (pretrain.launch.ray_worker)."""

        def __init__(self):
            self.value = False

        def set(self) -> None:
            self.value = True

        def is_set(self) -> bool:
            return self.value

    return StopFlag


def build_trainer(plan: JobPlan, stop_flag=None):
    """The Ray Train TorchTrainer of this plan."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .ray_worker import train_loop_per_worker

    backend = plan.cfg.engine.dist_backend
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        # Ray Train's print patch tees every print of a worker through logging: each progress line showed
        # up twice in `ray job logs`.
        "RAY_TRAIN_ENABLE_PRINT_PATCH": os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0"),
    }
    if not plan.use_gpu:
        env["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    for key in ("TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED"):
        if key in os.environ:
            env[key] = os.environ[key]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.worker_config(stop_flag),
        torch_config=TorchConfig(backend=None if backend == "auto" else backend),
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=bool(plan.use_gpu),
            resources_per_worker={"CPU": plan.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=plan.name,
            storage_path=plan.storage_path,
            failure_config=FailureConfig(max_failures=plan.max_failures),
            # The engine prunes old step directories itself (checkpoint.keep); Ray keeps its records only.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": env},
        ),
    )
