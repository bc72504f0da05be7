"""`ray job submit` end to end on a local Ray head: 2 CPU workers, ZeRO on gloo, the sample corpus.

The head is started by this module (`ray start --head --block` on 127.0.0.1, its own ports and temp dir,
RAY_AUTH_MODE=disabled) and stopped by killing exactly the processes it started. Jobs go through the real
`ray job submit` CLI with the repository as working dir.

* a clean run finishes with every step, checkpoints in the engine's layout, TensorBoard events and
  progress lines in `ray job logs`;
* a fault run kills training worker 1 (`--fail-once 1:5`: os._exit(1) when fetching the batch after step 5,
  one step past the checkpoint of step 4); Ray Train restarts the worker group, which resumes from that
  checkpoint: same final step count, and per (rank, step) exactly the samples of the clean run;
* bad input (missing manifest, unwritable storage, config error) fails at preflight, before any worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).parent / "ray")
TOTAL_STEPS = 8
FAIL_AT = 5  # rank 1 dies when fetching the batch after step 5; the last checkpoint is step 4


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _base_env() -> dict:
    env = dict(os.environ)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")
        ),
        PYTHONUNBUFFERED="1",
    )
    env.pop("RAY_ADDRESS", None)
    return env


class RayHead:
    """A single-node Ray cluster owned by this test module (stopped by pid, never `ray stop`)."""

    def __init__(self, num_cpus: int = 6):
        self.num_cpus = num_cpus
        self.tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        (gcs, dash, client, nm, om, metrics, agent_http, agent_grpc, rte, wmin) = _free_ports(10)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.cmd = [
            RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
            "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(rte), "--min-worker-port", str(wmin),
            "--max-worker-port", str(wmin + 200), "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--object-store-memory", str(256 * 1024**2), "--temp-dir", self.tmp, "--disable-usage-stats",
        ]  # fmt: skip
        self.proc: subprocess.Popen | None = None
        self.log = open(os.path.join(self.tmp, "ray_start.log"), "w")  # noqa: SIM115 - closed in stop()

    def start(self, timeout: float = 180) -> None:
        self.proc = subprocess.Popen(
            self.cmd, env=_base_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}: {self._log_text()}")
            with contextlib.suppress(Exception):
                with urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            time.sleep(1)
        else:
            self.stop()
            raise RuntimeError(f"the Ray head did not come up in {timeout}s: {self._log_text()}")
        # The job API can lag the dashboard's HTTP server by a few seconds.
        self._wait_jobs_api(deadline)

    def _wait_jobs_api(self, deadline: float) -> None:
        from ray.job_submission import JobSubmissionClient

        while time.monotonic() < deadline:
            try:
                JobSubmissionClient(self.dashboard).list_jobs()
                return
            except Exception:
                time.sleep(1)

    def _log_text(self) -> str:
        self.log.flush()
        return Path(self.tmp, "ray_start.log").read_text()[-3000:]

    def processes(self) -> list:
        """The `ray start` process and everything below it (raylet, GCS, dashboard, workers, job drivers)."""
        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        procs = self.processes()  # snapshot first: killing the raylet re-parents its workers to init
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------ jobs
RUNTIME_ENV_EXCLUDES = [".venv", ".git", ".cache", "runs", "data/sample", "*.so", "csrc/build"]


def submit(head: RayHead, job_args: list[str], timeout: float = 600) -> tuple[str, str]:
    """`ray job submit` (the CLI), wait for the end; returns (status, logs)."""
    from ray.job_submission import JobSubmissionClient

    sid = f"pretrain-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "env_vars": {
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "RAY_USAGE_STATS_ENABLED": "0",
            "TORCH_EXTENSIONS_DIR": _base_env()["TORCH_EXTENSIONS_DIR"],
            "RAY_JOB_STOP_WAIT_TIME_S": "120",
        },
        "excludes": RUNTIME_ENV_EXCLUDES,
    }
    cmd = [
        RAY_CLI, "job", "submit", "--address", head.dashboard, "--submission-id", sid,
        "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--no-wait",
        "--", "python", "-m", "pretrain.launch.ray_job", *job_args,
    ]  # fmt: skip
    out = subprocess.run(cmd, env=_base_env(), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    client = JobSubmissionClient(head.dashboard)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = client.get_job_status(sid)
        if status.is_terminal():
            break
        time.sleep(2)
    else:
        subprocess.run([RAY_CLI, "job", "stop", "--address", head.dashboard, sid], env=_base_env())
    return str(status.value if status is not None else None), client.get_job_logs(sid)


@pytest.fixture(scope="module")
def head():
    h = RayHead()
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pretrain.data import make_sample_corpus

    out = tmp_path_factory.mktemp("raycorpus")
    return make_sample_corpus(str(out), num=96, size=40, seed=5, num_val=0, shard_rows=48, row_group_rows=12)


def write_config(path: Path, manifest: str, **extra) -> str:
    text = f"""
name: raytest
seed: 0
model:
  variant: internimage_t
  num_classes: 10
  dcn_backend: reference
  drop_path_rate: 0.0
  overrides: {{channels: 16, depths: [1, 1, 1, 1], groups: [1, 2, 4, 8]}}
data:
  sources: [{{name: sample, uri: "{manifest}"}}]
  image_size: 32
  batch_size: 4
  num_workers: 1
  ray_num_cpus: 0.5
  prefetch: 1
objective:
  name: supervised
optim:
  lr: 1.0e-3
  lr_ref_batch: null
schedule:
  total_steps: {TOTAL_STEPS}
  warmup_steps: 1
engine:
  precision: fp32
  zero_stage: 1
  dist_backend: gloo
checkpoint:
  every_steps: 2
  keep: 0
logging:
  every_steps: 2
  dcn_points_every: 0
"""
    path.write_text(text)
    return str(path)


def job_args(cfg: str, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config", cfg, "--num-workers", "2", "--device", "cpu", "--storage-path", str(storage),
        "--name", name, "--max-failures", "2", *extra,
    ]  # fmt: skip


def effective_keys(record_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(rank, step) -> keys of the batch that step trained on; a replayed step's later record wins."""
    out: dict[tuple[int, int], list[str]] = {}
    for f in sorted(record_dir.glob("keys_rank*.jsonl")):
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            out[(rec["rank"], rec["step"])] = rec["keys"]
    return out


def records(record_dir: Path) -> list[dict]:
    return [json.loads(x) for f in sorted(record_dir.glob("*.jsonl")) for x in f.read_text().splitlines()]


@pytest.fixture(scope="module")
def clean_run(head, corpus, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clean")
    cfg = write_config(tmp / "cfg.yaml", corpus)
    t0 = time.time()
    status, logs = submit(head, job_args(cfg, tmp / "storage", "clean", "--record-keys", str(tmp / "keys")))
    return {
        "status": status,
        "logs": logs,
        "dir": tmp,
        "run": tmp / "storage" / "clean",
        "secs": time.time() - t0,
    }


# ------------------------------------------------------------------------------------------ tests
def test_clean_job_checkpoints_tensorboard_progress(clean_run):
    logs = clean_run["logs"]
    assert clean_run["status"] == "SUCCEEDED", logs[-6000:]
    run = clean_run["run"]
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step_{TOTAL_STEPS:08d}"
    tags = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert tags == [f"step_{s:08d}" for s in range(2, TOTAL_STEPS + 1, 2)]
    final = ckpts / f"step_{TOTAL_STEPS:08d}"
    # every rank's DeepSpeed shard and data cursor, in the engine's layout
    assert sorted(p.name for p in final.glob("trainer_rank*.pt")) == [
        "trainer_rank00000.pt",
        "trainer_rank00001.pt",
    ]
    assert len(list(final.glob("*optim_states.pt"))) == 2 and list(final.glob("*model_states.pt"))
    meta = json.loads((final / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["step"] == TOTAL_STEPS
    import torch

    for rank in (0, 1):
        state = torch.load(final / f"trainer_rank{rank:05d}.pt", map_location="cpu", weights_only=False)
        assert state["step"] == TOTAL_STEPS and state["stream"]["consumed"] == TOTAL_STEPS * 4 * 2
    # TensorBoard in the run's storage, with the loss of every logged step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/loss")] == list(range(2, TOTAL_STEPS + 1, 2))
    # progress for people, in `ray job logs`
    assert f"step {TOTAL_STEPS}/{TOTAL_STEPS}" in logs and "samples/s" in logs and "ETA" in logs
    assert "finished" in logs
    # the consumed samples: every rank's batch of every step once, disjoint across ranks
    keys = effective_keys(clean_run["dir"] / "keys")
    assert sorted(keys) == [(r, s) for r in (0, 1) for s in range(TOTAL_STEPS)]
    flat = [k for v in keys.values() for k in v]
    assert len(flat) == len(set(flat)) == TOTAL_STEPS * 4 * 2


def test_clean_checkpoint_is_usable_by_convert(clean_run, tmp_path):
    """The Ray run's checkpoint is the engine's: `pretrain convert` consolidates it from the run's root."""
    assert clean_run["status"] == "SUCCEEDED"
    out = tmp_path / "model.safetensors"
    cmd = [sys.executable, "-m", "pretrain.cli", "convert", str(clean_run["run"] / "checkpoints"), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_base_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "step_00000008" in res.stdout and "world_size: 2" in res.stdout
    from safetensors.torch import load_file

    weights = load_file(str(out))
    assert any(k.startswith("patch_embed.") for k in weights) and any(
        k.startswith("levels.") for k in weights
    )


def test_worker_killed_mid_run_resumes_exactly(head, corpus, clean_run, tmp_path):
    assert clean_run["status"] == "SUCCEEDED"
    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    status, logs = submit(
        head,
        job_args(cfg, tmp_path / "storage", "fault", "--record-keys", str(tmp_path / "keys"),
                 "--fail-once", f"1:{FAIL_AT}"),
    )  # fmt: skip
    assert status == "SUCCEEDED", logs[-6000:]
    run = tmp_path / "storage" / "fault"
    assert (run / f".fail_once_rank1_step{FAIL_AT}").exists(), "the fault was not injected"
    assert "[fault injection] rank 1" in logs
    assert "resuming from" in logs and "step_00000004" in logs
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{TOTAL_STEPS:08d}"
    # the step count is exact ...
    import torch

    for rank in (0, 1):
        state = torch.load(
            run / "checkpoints" / f"step_{TOTAL_STEPS:08d}" / f"trainer_rank{rank:05d}.pt",
            map_location="cpu",
            weights_only=False,
        )
        assert state["step"] == TOTAL_STEPS and state["stream"]["consumed"] == TOTAL_STEPS * 4 * 2
    # ... and so are the samples: the second worker group re-read step 4 (after the step-4 checkpoint) on
    # both ranks with the same keys, and every (rank, step) trained on the clean run's batch
    recs = records(tmp_path / "keys")
    pids = {r["pid"] for r in recs}
    assert len(pids) == 4, "expected two worker groups of two workers"
    seen: dict[tuple[int, int], list[list[str]]] = {}
    for r in recs:
        seen.setdefault((r["rank"], r["step"]), []).append(r["keys"])
    replayed = {k for k, v in seen.items() if len(v) > 1}
    assert replayed == {(0, 4), (1, 4)} or replayed == {(0, 4), (1, 4), (0, 5)}, sorted(replayed)
    for v in seen.values():
        assert all(x == v[0] for x in v)  # a replay delivers the very same samples
    assert effective_keys(tmp_path / "keys") == effective_keys(clean_run["dir"] / "keys")
    # training continued where it stopped: TensorBoard has every logged step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert sorted({e.step for e in acc.Scalars("loss/loss")}) == list(range(2, TOTAL_STEPS + 1, 2))


def test_bad_input_fails_at_preflight_through_ray_job(head, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", str(tmp_path / "nowhere" / "manifest.json"))
    status, logs = submit(head, job_args(cfg, tmp_path / "storage", "bad"))
    assert status == "FAILED"
    assert "preflight failed: data.sources[0] (sample)" in logs and "does not exist" in logs
    assert "RayTrainWorker" not in logs and not (tmp_path / "storage" / "bad" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ preflight only
def _main(*argv: str) -> int:
    from pretrain.launch.ray_job import main

    return main(list(argv))


@pytest.mark.parametrize("case", ["manifest", "storage", "config_key", "config_value", "relative_storage"])
def test_preflight_errors_are_clear(case, corpus, tmp_path, capsys):
    manifest = str(tmp_path / "missing" / "manifest.json") if case == "manifest" else corpus
    cfg = write_config(tmp_path / "cfg.yaml", manifest)
    storage = str(tmp_path / "storage")
    args = ["--config", cfg, "--num-workers", "2", "--storage-path", storage, "--name", "x", "--check"]
    if case == "storage":
        (tmp_path / "afile").write_text("not a directory")
        args[args.index(storage)] = str(tmp_path / "afile" / "runs")
    if case == "config_key":
        args += ["--set", "engine.zero_stag=2"]
    if case == "config_value":
        args += ["--set", "engine.precision=fp8"]
    if case == "relative_storage":
        args[args.index(storage)] = "runs/here"
    assert _main(*args) == 2
    err = capsys.readouterr().err
    assert "preflight failed" in err
    expected = {
        "manifest": "does not exist",
        "storage": "is not writable",
        "config_key": "did you mean 'engine.zero_stage'",
        "config_value": "engine.precision",
        "relative_storage": "is relative",
    }[case]
    assert expected in err, err


def test_preflight_rejects_world_size_change(corpus, tmp_path, capsys):
    from pretrain.launch.ray_job import build_parser, plan_job

    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    root = tmp_path / "storage" / "x" / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "meta.json").write_text(json.dumps({"step": 2, "world_size": 4}))
    (root / "latest").write_text("step_00000002")
    args = ["--config", cfg, "--num-workers", "2", "--storage-path", str(tmp_path / "storage"), "--name", "x"]
    assert _main(*args, "--check") == 2
    assert "written by 4 ranks" in capsys.readouterr().err
    plan = plan_job(build_parser().parse_args([*args[:3], "4", *args[4:]]))
    assert any("resuming from checkpoints/step_00000002" in n for n in plan.notes)
    assert plan.cfg.checkpoint.dir == str(root) and plan.cfg.data.reader == "ray"
