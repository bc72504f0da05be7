"""Launchers that start the engine's Trainer on a cluster; they hold no training logic.

The Ray job, one module per job: `ray_job` (the driver's command line, `ray job submit ... -- python -m
pretrain.launch.ray_job`), `preflight` (checks and the `JobPlan`), `ray_train` (the Ray Train `TorchTrainer`
and stop flag) and `ray_worker` (what each Ray Train worker runs). Ray is imported only inside these modules.
"""
