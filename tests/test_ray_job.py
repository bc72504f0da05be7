"""`ray job submit` end to end on a local Ray head: 2 CPU workers, ZeRO on gloo, the sample corpus.

The head is started by this module (`ray start --head --block` on 127.0.0.1, its own ports and temp dir,
RAY_AUTH_MODE=disabled) and stopped by killing exactly the processes it started. Jobs go through the real
`ray job submit` CLI with the repository as working dir.

* a clean run (12 steps, crossing an epoch boundary; storage on s3:// served by moto on 127.0.0.1 when
  moto/s3fs are installed) finishes with every step, checkpoints in the engine's layout (usable by
  `pretrain convert`), TensorBoard events in the run's storage and progress lines in `ray job logs`; each
  rank records the sample keys it consumed per step;
* the same run interrupted twice: `ray job stop` (the workers save on the stop), a resubmission with the same
  name (resumes), and worker 1 killed mid-run (`--fail-once 1:11`: os._exit(1) one step past the checkpoint
  of step 10); Ray Train restarts the worker group from that checkpoint. The step count is exact and every
  (rank, step) trained on exactly the clean run's samples;
* bad input (missing manifest, unwritable storage, config error, world-size change) fails at preflight,
  before any worker starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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
CORPUS = 80  # samples: one epoch is 10 steps of 2 ranks x 4, so a 12-step run crosses into epoch 2
STEPS_PER_EPOCH = CORPUS // 8
TOTAL_STEPS = 12
FAIL_AT = 11  # rank 1 dies fetching the batch after step 11; the last checkpoint is step 10 (epoch end)


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


def _free_range(width: int, avoid: set[int]) -> int:
    """First port of `width` consecutive free ports, none of them in `avoid` (Ray's worker ports)."""
    for _ in range(100):
        first = _free_ports(1)[0]
        if first + width > 65535 or avoid & set(range(first, first + width)):
            continue
        try:
            _free_ports_at(range(first, first + width))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {width} consecutive free ports")


def _free_ports_at(ports) -> None:
    socks = []
    try:
        for port in ports:
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", port))
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
        ports = _free_ports(9)
        (gcs, dash, client, nm, om, metrics, agent_http, agent_grpc, rte) = ports
        wmin = _free_range(60, set(ports))
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.cmd = [
            RAY_CLI, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
            "--ray-client-server-port", str(client), "--node-manager-port", str(nm),
            "--object-manager-port", str(om), "--metrics-export-port", str(metrics),
            "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(rte), "--min-worker-port", str(wmin),
            "--max-worker-port", str(wmin + 59), "--num-cpus", str(num_cpus), "--num-gpus", "0",
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
RUNTIME_ENV_EXCLUDES = ["/.venv/", "/.git/", "/.cache/", "/runs/", "/data/", "*.so", "/csrc/build/"]


def submit_nowait(head: RayHead, job_args: list[str]) -> str:
    """`ray job submit --no-wait` (the CLI); returns the submission id."""
    sid = f"pretrain-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {
        "env_vars": {
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "RAY_USAGE_STATS_ENABLED": "0",
            "TORCH_EXTENSIONS_DIR": _base_env()["TORCH_EXTENSIONS_DIR"],
            "RAY_JOB_STOP_WAIT_TIME_S": "120",  # time for the checkpoint a stop triggers
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
    return sid


def wait_job(head: RayHead, sid: str, timeout: float = 600) -> tuple[str, str]:
    """Wait for a terminal status (stopping the job on timeout); returns (status, logs)."""
    from ray.job_submission import JobSubmissionClient

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


def submit(head: RayHead, job_args: list[str], timeout: float = 600) -> tuple[str, str]:
    return wait_job(head, submit_nowait(head, job_args), timeout)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (AWS_* env set before the head starts, so every Ray worker inherits
    it), or None without moto/s3fs: the clean run then uses local storage."""
    try:
        from test_data_s3 import moto_server
    except (ImportError, pytest.skip.Exception):
        yield None
        return
    with moto_server() as endpoint:
        import s3fs

        s3fs.S3FileSystem().mkdir("pretrain-ray-test")
        yield endpoint


@pytest.fixture(scope="module")
def head(s3):
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
    return make_sample_corpus(
        str(out), num=CORPUS, size=40, seed=5, num_val=0, shard_rows=40, row_group_rows=10
    )


def write_config(path: Path, manifest: str, total_steps: int = TOTAL_STEPS, every_steps: int = 2) -> str:
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
  total_steps: {total_steps}
  warmup_steps: 1
engine:
  precision: fp32
  zero_stage: 1
  dist_backend: gloo
checkpoint:
  every_steps: {every_steps}
  keep: 0
logging:
  every_steps: 2
  dcn_points_every: 0
"""
    path.write_text(text)
    return str(path)


def job_args(cfg: str, storage: Path | str, name: str, *extra: str) -> list[str]:
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
def clean_run(head, s3, corpus, tmp_path_factory):
    """The uninterrupted reference run; its storage is s3:// (moto) when available, else a local path.
    The run directory is copied back so that the tests read it locally."""
    tmp = tmp_path_factory.mktemp("clean")
    cfg = write_config(tmp / "cfg.yaml", corpus)
    storage = "s3://pretrain-ray-test/runs" if s3 else str(tmp / "storage")
    t0 = time.time()
    status, logs = submit(head, job_args(cfg, storage, "clean", "--record-keys", str(tmp / "keys")))
    (tmp / "job.log").write_text(logs)  # for a person debugging a failure
    run = tmp / "storage" / "clean"
    if s3:
        import s3fs

        remote = s3fs.S3FileSystem()
        if remote.exists("pretrain-ray-test/runs/clean"):
            remote.get("pretrain-ray-test/runs/clean/", str(run) + "/", recursive=True)
    return {"status": status, "logs": logs, "dir": tmp, "run": run, "secs": time.time() - t0, "s3": bool(s3)}


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
        assert state["step"] == TOTAL_STEPS and state["stream"]["epoch"] == 1
        assert state["stream"]["consumed"] == (TOTAL_STEPS - STEPS_PER_EPOCH) * 8
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
    epoch1 = [k for (_, step), v in keys.items() if step < STEPS_PER_EPOCH for k in v]
    epoch2 = [k for (_, step), v in keys.items() if step >= STEPS_PER_EPOCH for k in v]
    assert len(epoch1) == len(set(epoch1)) == CORPUS  # every sample once per epoch
    assert len(epoch2) == len(set(epoch2)) == (TOTAL_STEPS - STEPS_PER_EPOCH) * 8


def test_clean_checkpoint_is_usable_by_convert(clean_run, tmp_path):
    """The Ray run's checkpoint is the engine's: `pretrain convert` consolidates it from the run's root."""
    assert clean_run["status"] == "SUCCEEDED"
    out = tmp_path / "model.safetensors"
    cmd = [sys.executable, "-m", "pretrain.cli", "convert", str(clean_run["run"] / "checkpoints"), str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_base_env())
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"step_{TOTAL_STEPS:08d}" in res.stdout and "world_size: 2" in res.stdout
    from safetensors.torch import load_file

    weights = load_file(str(out))
    assert any(k.startswith("patch_embed.") for k in weights) and any(
        k.startswith("levels.") for k in weights
    )


def test_stop_resubmit_and_worker_crash_resume_exactly(head, corpus, clean_run, tmp_path):
    """One run, interrupted twice, must train on exactly the clean run's samples, step by step.

    1. `ray job stop` right after the worker group starts: the driver gets SIGTERM, the workers finish the
       step, save (step s) and return; the job is STOPPED.
    2. The same job (same --name and storage) submitted again resumes from step s (Ray Train V2 semantics),
       and worker 1 is killed (os._exit) fetching the batch after step 11, one step past the checkpoint of
       step 10, which is also the end of the first epoch. Ray Train restarts the worker group, which resumes
       from step 10 and finishes.
    """
    assert clean_run["status"] == "SUCCEEDED"
    from ray.job_submission import JobSubmissionClient

    cfg = write_config(tmp_path / "cfg.yaml", corpus)
    keys_dir = tmp_path / "keys"
    args = job_args(cfg, tmp_path / "storage", "faulty", "--record-keys", str(keys_dir))
    run = tmp_path / "storage" / "faulty"
    root = run / "checkpoints"

    # 1. stop
    sid = submit_nowait(head, args)
    client = JobSubmissionClient(head.dashboard)
    deadline = time.monotonic() + 300
    while "starting fresh" not in client.get_job_logs(sid):
        assert time.monotonic() < deadline, client.get_job_logs(sid)[-4000:]
        assert not client.get_job_status(sid).is_terminal(), client.get_job_logs(sid)[-4000:]
        time.sleep(0.5)
    res = subprocess.run(
        [RAY_CLI, "job", "stop", "--address", head.dashboard, sid],
        env=_base_env(), capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    status, logs = wait_job(head, sid, timeout=200)
    assert status == "STOPPED", logs[-4000:]
    assert "SIGTERM received" in logs and "(signal SIGTERM)" in logs
    stopped_at = int((root / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped_at < FAIL_AT - 1, f"the stop landed too late (step {stopped_at})"
    assert json.loads((root / f"step_{stopped_at:08d}" / "meta.json").read_text())["world_size"] == 2

    # 2. resubmit (same name): resume, then lose a worker
    status, logs = submit(head, [*args, "--fail-once", f"1:{FAIL_AT}"])
    assert status == "SUCCEEDED", logs[-6000:]
    assert f"resuming from checkpoints/step_{stopped_at:08d}" in logs  # the driver's preflight note
    assert f"resuming from {root}/step_{stopped_at:08d}" in logs  # the first worker group
    assert (run / f".fail_once_rank1_step{FAIL_AT}").exists() and "[fault injection] rank 1" in logs
    assert f"resuming from {root}/step_{FAIL_AT - 1:08d}" in logs  # the restarted worker group
    assert (root / "latest").read_text().strip() == f"step_{TOTAL_STEPS:08d}"
    import torch

    for rank in (0, 1):
        state = torch.load(
            root / f"step_{TOTAL_STEPS:08d}" / f"trainer_rank{rank:05d}.pt",
            map_location="cpu",
            weights_only=False,
        )
        assert state["step"] == TOTAL_STEPS and state["stream"]["epoch"] == 1
        assert state["stream"]["consumed"] == (TOTAL_STEPS - STEPS_PER_EPOCH) * 8

    # the samples are exact: three worker groups (stopped, resubmitted, restarted after the crash) ...
    recs = records(keys_dir)
    assert len({r["pid"] for r in recs}) == 6
    seen: dict[tuple[int, int], list[list[str]]] = {}
    for r in recs:
        seen.setdefault((r["rank"], r["step"]), []).append(r["keys"])
    # ... where only step 10, trained after the last checkpoint before the crash, was read twice (with the
    # same samples both times; rank 0 may also have fetched step 11's batch before its peer died), nothing
    # was skipped, and each (rank, step) got the clean run's batch
    replayed = {k for k, v in seen.items() if len(v) > 1}
    assert replayed - {(0, FAIL_AT)} == {(0, FAIL_AT - 1), (1, FAIL_AT - 1)}, sorted(replayed)
    assert all(x == v[0] for v in seen.values() for x in v)
    assert effective_keys(keys_dir) == effective_keys(clean_run["dir"] / "keys")
    # TensorBoard continued across the three worker groups
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {e.step for e in acc.Scalars("loss/loss")} == set(range(2, TOTAL_STEPS + 1, 2))


def test_submit_example_script_bad_manifest_fails_at_preflight(head, tmp_path):
    """launch/submit_example.sh as a user runs it (WAIT=1) with a config naming a missing manifest: the job
    FAILS at the driver's preflight with a clear line, and no training worker ever starts."""
    cfg = write_config(tmp_path / "cfg.yaml", str(tmp_path / "nowhere" / "manifest.json"))
    path = f"{Path(RAY_CLI).parent}:{os.environ['PATH']}"
    env = {**_base_env(), "RAY_ADDRESS": head.dashboard, "WAIT": "1", "PATH": path}
    script = str(REPO / "launch" / "submit_example.sh")
    res = subprocess.run(
        ["bash", script, *job_args(cfg, tmp_path / "storage", "bad")],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-4000:]
    assert "preflight failed: data.sources[0] (sample)" in out and "does not exist" in out
    assert re.search(r"Job '[^']+' failed", out), out[-2000:]
    assert "RayTrainWorker" not in out and not (tmp_path / "storage" / "bad" / "checkpoints").exists()


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
    from pretrain.launch.preflight import plan_job
    from pretrain.launch.ray_job import build_parser

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
    assert _main(*args[:3], "4", *args[4:], "--set", "schedule.total_steps=2", "--check") == 2
    assert "already at step 2" in capsys.readouterr().err
    assert plan.cfg.checkpoint.dir == str(root) and plan.cfg.data.reader == "ray"


def test_resume_target_prefers_the_newest_complete_checkpoint(tmp_path):
    """Ray's reported checkpoint vs the engine's `latest` (newer after a crash between save and report)."""
    from types import SimpleNamespace

    from pretrain.launch.ray_worker import resume_target

    root = str(tmp_path / "ckpt")
    assert resume_target(root, None, None) is None
    assert resume_target(root, None, "/seed/step_00000007") == "/seed/step_00000007"
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "latest").write_text("step_00000006")
    reported = SimpleNamespace(path=f"{root}/step_00000004")
    assert resume_target(root, reported, "/seed/step_00000007") == f"{root}/step_00000006"
    (tmp_path / "ckpt" / "latest").write_text("step_00000002")
    assert resume_target(root, reported, None) == f"{root}/step_00000004"
