"""Stopping a multi-rank run from outside: SIGTERM to launch/deepspeed_train.sh, a SIGSTOP-frozen rank, and a
JIT-build lock left by a killed build. Two CPU ranks on gloo with the tiny config and the synthetic stream."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.engine import dist as pdist
from pretrain.engine.local_launch import spawn, wait

REPO = Path(__file__).resolve().parents[1]
ENV = {
    "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore::FutureWarning",
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(out: Path, steps: int = 100000) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
        "--output-dir", str(out),
        "--set", "synthetic.enabled=true",
        "--set", "synthetic.image_size=32",
        "--set", "synthetic.batch_size=8",
        "--set", f"schedule.total_steps={steps}",
        "--set", "logging.every_steps=1",
        "--set", "logging.dcn_points_every=0",
        "--set", "checkpoint.every_steps=0",
    ]  # fmt: skip


def _wait_for(read, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in read():
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{read()[-3000:]}"
        time.sleep(0.2)


def _tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_reaches_the_ranks_which_save(tmp_path):
    """What a scheduler does: SIGTERM to the launcher script's process group. The ranks finish the step, save
    it and exit; the script waits for them (DeepSpeed's runner died at once and left the ranks training, or,
    signalled too, its launcher killed the ranks 30 s later, saved or not)."""
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    out = tmp_path / "run"
    log = tmp_path / "launcher.log"
    env = {**os.environ, **ENV, "NUM_GPUS": "2", "MASTER_PORT": str(_port())}
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(REPO / "launch" / "deepspeed_train.sh"), *_args(out)],
            env=env,
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the test kills only what it started
        )
    tree: list[int] = []
    try:
        _wait_for(log.read_text, "step 2/", 180)
        tree = _tree(proc.pid)
        assert len(tree) >= 4, tree  # script, runner, launch.py, 2 ranks
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # the script's whole process group, as schedulers do
        rc = proc.wait(timeout=60)
        took = time.monotonic() - t0
        time.sleep(0.5)
        left = [p for p in tree if _alive(p)]
    finally:
        for pid in [proc.pid, *tree]:  # whatever survived (the old launcher left the ranks training)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert not left, f"processes left behind: {left}"
    assert rc == 128 + signal.SIGTERM, text[-4000:]  # `pretrain train`'s code after a stop on SIGTERM
    assert "asking the ranks" in text and "(signal SIGTERM)" in text, text[-4000:]
    latest = (out / "checkpoints" / "latest").read_text().strip()
    step = int(latest.split("_")[1])
    assert f"stopped at step {step} (signal SIGTERM)" in text and step >= 2
    assert sorted(p.name for p in (out / "checkpoints" / latest).glob("trainer_rank*.pt")) == [
        "trainer_rank00000.pt",
        "trainer_rank00001.pt",
    ]
    assert took < 30, took


@pytest.mark.slow
def test_a_frozen_rank_ends_the_job_with_a_message(tmp_path):
    """SIGSTOP one rank mid-run: its neighbour's heartbeat watcher names it and exits, the launcher stops the
    rest; before, every rank waited forever."""
    env = {**ENV, pdist.HEARTBEAT_TIMEOUT_ENV: "4"}
    procs = spawn(2, _args(tmp_path / "run"), env=env)
    try:
        _wait_for(
            lambda: os.pread(procs[0].log.fileno(), 1 << 22, 0).decode(errors="replace"), "step 2/", 180
        )
        procs[1].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        results = wait(procs, timeout=90, grace=5)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r0, r1 = results
    assert r0.returncode == pdist.HEARTBEAT_EXIT_CODE, r0.output[-3000:]
    assert "rank 1 (" in r0.output and "has sent no heartbeat" in r0.output and "pid" in r0.output, r0.output[
        -3000:
    ]
    assert r1.returncode == -signal.SIGKILL
    assert took < 30, took


def test_a_stale_extension_lock_is_reported_not_waited_on(tmp_path):
    build = tmp_path / "ext" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "build.ninja").write_text("")
    (build / "lock").write_text("")
    old = time.time() - 3600
    for f in build.iterdir():
        os.utime(f, (old, old))
    with pytest.raises(pdist.ExtensionLockError, match=r"deepspeed_shm_comm/lock.*rm "):
        pdist.check_extension_locks(str(tmp_path / "ext"), stale_s=600)
    os.utime(build / "build.ninja")  # a build that is still writing: not stale
    pdist.check_extension_locks(str(tmp_path / "ext"), stale_s=600)


def test_extensions_dir_is_per_environment_with_its_ninja_first(tmp_path):
    """Unset, TORCH_EXTENSIONS_DIR becomes a folder of this Python environment, and the environment's bin/
    (its ninja) comes first on PATH, so another ninja never triggers a rebuild of the same cache."""
    code = (
        "import os, sys; from pretrain.engine import dist; root = dist.prepare_extensions_dir(); "
        "print(root); print(os.environ['PATH'].split(os.pathsep)[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env["PATH"] = "/usr/bin" + os.pathsep + env.get("PATH", "")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    root, first = r.stdout.split()
    assert root.startswith(sys.prefix) or "/env-" in root
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")):
        assert first == bindir


def test_launcher_finds_the_checkouts_venv_without_activation(tmp_path):
    """`launch/deepspeed_train.sh` from a shell where the venv is not activated (PATH without its bin/):
    the script puts the checkout's .venv/bin first instead of failing on `deepspeed: command not found`."""
    if not (REPO / ".venv" / "bin" / "deepspeed").exists():
        pytest.skip("no .venv with deepspeed in this checkout")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(ENV, PATH="/usr/bin:/bin", NUM_GPUS="1", MASTER_PORT=str(_port()))
    r = subprocess.run(
        [
            str(REPO / "launch" / "deepspeed_train.sh"),
            "--config",
            str(REPO / "configs/tiny_cpu.yaml"),
            "--print-config",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "name: tiny_cpu" in r.stdout


_STALLED_RANK = """
import os, sys, time
from pretrain.engine import dist
dist.ensure_process_group("gloo")
if dist.rank() == 1:
    time.sleep(30)  # never joins the collective (and never leaves the group)
    sys.exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce_max([1.0])
except dist.CollectiveTimeoutError as err:
    print(f"TIMEOUT after {time.monotonic() - t0:.1f}s: {err}", flush=True)
    os._exit(3)
print("no timeout", flush=True)
"""


@pytest.mark.slow
def test_collectives_time_out_with_a_named_error(tmp_path):
    """The process group gets PRETRAIN_COLLECTIVE_TIMEOUT_S (DeepSpeed's default is 30 min); a collective that
    another rank never joins raises CollectiveTimeoutError, which says what happened."""
    from pretrain.engine.dist import local_world_env

    port = _port()
    env = {**os.environ, **ENV, pdist.COLLECTIVE_TIMEOUT_ENV: "3", pdist.HEARTBEAT_TIMEOUT_ENV: "0"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STALLED_RANK],
            env={**env, **local_world_env(r, 2, port)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    try:
        out0, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, out0[-3000:]
    took = float(out0.split("TIMEOUT after ")[1].split("s:")[0])
    assert took < 20 and "did not complete within the collective timeout" in out0


def test_pretrain_train_reports_a_stale_lock_in_one_line(tmp_path):
    """The CLI turns the stale-lock error into one `error:` line and exit 1 (not a traceback)."""
    build = tmp_path / "ext" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    (build / "lock").write_text("")
    old = time.time() - 3600
    os.utime(build / "lock", (old, old))
    env = {**os.environ, **ENV, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    cmd = [sys.executable, "-m", "pretrain.cli", "train", "--config", "configs/tiny_cpu.yaml"]
    cmd += ["--set", "synthetic.enabled=true", "--output-dir", str(tmp_path / "run")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "deepspeed_shm_comm/lock" in errors[0] and "Traceback" not in r.stderr
