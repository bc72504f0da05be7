"""Start N local ranks of `pretrain train` with the launcher environment set (tests, debugging on one host).

    python -m pretrain.engine.local_launch --nproc 2 -- --config configs/tiny_cpu.yaml

Equivalent to `deepspeed --num_gpus N --no_local_rank --module pretrain.cli train ...` without the launcher:
each rank gets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT and OMP_NUM_THREADS=1 (unless set).

Like a launcher should: SIGTERM/SIGINT to this process go to every rank (which finish the step, save and
exit), and when one rank fails the others get SIGTERM and, after `grace` seconds, SIGKILL (a frozen rank
would otherwise keep the job alive).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from .dist import _free_port, local_world_env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str


def spawn(nproc: int, train_args: list[str], env: dict | None = None) -> list[subprocess.Popen]:
    """Start the ranks; each one's output (stderr merged) goes to a temporary file (pipes could fill up and
    block a rank while we wait on another)."""
    port = str(_free_port())
    procs = []
    for rank in range(nproc):
        e = dict(os.environ)
        e.update(env or {})
        e.update(local_world_env(rank, nproc, port))
        e.setdefault("OMP_NUM_THREADS", "1")
        log = tempfile.TemporaryFile(mode="w+")
        p = subprocess.Popen(
            [sys.executable, "-m", "pretrain.cli", "train", *train_args],
            env=e,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        p.log = log  # type: ignore[attr-defined]
        procs.append(p)
    return procs


def _output(p: subprocess.Popen) -> str:
    p.log.seek(0)
    text = p.log.read()
    p.log.close()
    return text


# exit codes of a rank that stopped on a signal after saving (`pretrain train` returns 128 + the signal)
_STOPPED = {128 + signal.SIGTERM, 128 + signal.SIGINT}


def wait(
    procs: list[subprocess.Popen], timeout: float | None = None, grace: float = 30.0
) -> list[RankResult]:
    """Wait for every rank and report what they printed. When one fails, SIGTERM the others (not after a
    stop on a signal: they are saving too) and SIGKILL whatever is left `grace` seconds later; on timeout
    kill them all (by pid)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    kill_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        if failed and kill_at is None:
            kill_at = now + grace
            if failed[0] not in _STOPPED:
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
        if (deadline is not None and now > deadline) or (kill_at is not None and now > kill_at):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
                    p.wait()
            break
        time.sleep(0.1)
    return [RankResult(r, p.returncode, _output(p)) for r, p in enumerate(procs)]


def run_local(nproc: int, train_args: list[str], env: dict | None = None, timeout: float | None = None):
    return wait(spawn(nproc, train_args, env), timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="arguments of `pretrain train` after --")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    procs = spawn(args.nproc, train_args)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    results = wait(procs)
    for r in results:
        print(f"===== rank {r.rank} (exit {r.returncode}) =====\n{r.output}")
    return max((abs(r.returncode) for r in results), default=0)


if __name__ == "__main__":
    sys.exit(main())
