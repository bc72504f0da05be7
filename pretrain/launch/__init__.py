"""Launchers that start the engine's Trainer on a cluster; they hold no training logic.

`pretrain.launch.ray_job` (driver, `ray job submit ... -- python -m pretrain.launch.ray_job`) and
`pretrain.launch.ray_worker` (what each Ray Train worker runs). Ray is imported only inside these modules.
"""
