"""Process-group plumbing: the trainer works under any launcher, or none.

Launchers (`deepspeed`, `torchrun`, Ray Train) set RANK/WORLD_SIZE/MASTER_* and possibly create the process
group themselves; a bare `pretrain train` has none of that, so `ensure_process_group` fills in a world of one
(without it DeepSpeed falls back to MPI discovery and fails on a missing mpi4py).

A rank that stops making progress must end the job, not hang it:
- every collective has a timeout (PRETRAIN_COLLECTIVE_TIMEOUT_S, default 1800 s as DeepSpeed's), and the
  helpers below turn a timed-out collective into a `CollectiveTimeoutError` that says what happened;
- when this module creates the process group (the `deepspeed` launcher, `local_launch`, a single process;
  not Ray Train, which owns its group and its workers' health), each rank beats a heartbeat through the
  launcher's rendezvous store and watches the next rank's (a ring: O(1) per rank). A rank whose heartbeat
  stops for PRETRAIN_HEARTBEAT_TIMEOUT_S (default 300 s; 0 turns it off) is frozen (SIGSTOP, a hung driver)
  or gone: its watcher prints who and why and exits with HEARTBEAT_EXIT_CODE, so the launcher stops the job.

JIT-built extensions (DeepSpeed's CPU comm op, FusedAdam) go to one directory per Python environment
(TORCH_EXTENSIONS_DIR, default `<sys.prefix>/var/torch_extensions`), built with that environment's ninja,
and a build lock left by a killed build is reported instead of waited on forever.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import glob
import hashlib
import os
import socket
import sys
import threading
import time

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT_ENV = "PRETRAIN_COLLECTIVE_TIMEOUT_S"
HEARTBEAT_TIMEOUT_ENV = "PRETRAIN_HEARTBEAT_TIMEOUT_S"
EXTENSION_LOCK_STALE_ENV = "PRETRAIN_EXTENSION_LOCK_STALE_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 300.0
DEFAULT_EXTENSION_LOCK_STALE_S = 600.0
HEARTBEAT_EXIT_CODE = 75  # EX_TEMPFAIL: the job can be restarted (--resume auto) once the bad rank is gone


class CollectiveTimeoutError(RuntimeError):
    """A collective waited longer than the process-group timeout: another rank is frozen, dead or stuck."""


class ExtensionLockError(RuntimeError):
    """A JIT-build lock left by a killed build (torch would wait on it forever)."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must be >= 0 seconds")
    return value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_world_env(rank: int, world: int, port: int | str) -> dict[str, str]:
    """The launcher variables of rank `rank` in a single-node world of `world` ranks on 127.0.0.1:`port`."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }


def set_single_process_env() -> None:
    """RANK=0, WORLD_SIZE=1, ... for a run without a launcher (values already set are kept)."""
    for key, value in local_world_env(0, 1, _free_port()).items():
        os.environ.setdefault(key, value)


def backend_for(choice: str = "auto") -> str:
    if choice != "auto":
        return choice
    return "nccl" if torch.cuda.is_available() else "gloo"


def ensure_process_group(
    backend: str = "auto", timeout_s: float | None = None, heartbeat_timeout_s: float | None = None
) -> None:
    """Join the launcher's process group, or create a world of one. Idempotent.

    `timeout_s` bounds every collective (default: PRETRAIN_COLLECTIVE_TIMEOUT_S or 1800 s); a group created
    here also gets the heartbeat (`heartbeat_timeout_s`, default PRETRAIN_HEARTBEAT_TIMEOUT_S or 300 s)."""
    if timeout_s is None:
        timeout_s = _env_seconds(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_seconds(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S)
    creating = not (dist.is_available() and dist.is_initialized())
    if creating:
        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
            set_single_process_env()
        os.environ.setdefault("LOCAL_RANK", os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    root = prepare_extensions_dir()
    import deepspeed

    # DeepSpeed's comm layer wraps an existing torch process group (Ray Train creates one) or makes its own;
    # its first call JIT-builds the CPU comm op, watched for a lock that a killed build left behind.
    with _watch_extension_locks(root):
        deepspeed.init_distributed(
            dist_backend=backend_for(backend),
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    if creating and heartbeat_timeout_s > 0 and world_size() > 1:
        start_heartbeat(heartbeat_timeout_s)


# ---------------------------------------------------------------------------------------- JIT extensions
def prepare_extensions_dir() -> str:
    """Point TORCH_EXTENSIONS_DIR at this environment's own folder (unless set) and put the environment's
    ninja first on PATH; fail now if a killed build left a lock there. Returns the folder.

    Every process JIT-builds DeepSpeed's CPU comm op; two ninja versions alternating on one cache
    rebuild it each time ("command line changed"), and torch waits forever on a dead build's lock.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.exists(os.path.join(bindir, "ninja")) and path[:1] != [bindir]:
        os.environ["PATH"] = os.pathsep.join([bindir, *path])
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        root = os.path.join(sys.prefix, "var", "torch_extensions")
        try:
            os.makedirs(root, exist_ok=True)
            if not os.access(root, os.W_OK):
                raise PermissionError(root)
        except OSError:  # a read-only (system) environment: one folder per environment under the user cache
            tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
            root = os.path.join(os.path.expanduser("~/.cache/torch_extensions"), f"env-{tag}")
        os.environ["TORCH_EXTENSIONS_DIR"] = root
    check_extension_locks(root)
    return root


def _stale_locks(root: str, stale_s: float) -> list[tuple[str, float]]:
    """(lock, seconds since anything in its build folder changed) for each lock older than stale_s."""
    out = []
    for lock in glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock")):
        folder = os.path.dirname(lock)
        try:
            newest = max(os.stat(os.path.join(folder, f)).st_mtime for f in os.listdir(folder))
        except (OSError, ValueError):  # the build just finished and removed it
            continue
        idle = time.time() - newest
        if idle > stale_s:
            out.append((lock, idle))
    return out


def _lock_message(lock: str, idle: float, stale_s: float) -> str:
    return (
        f"{lock} is a JIT-build lock that nothing has touched for {idle:.0f}s (limit {stale_s:.0f}s, "
        f"{EXTENSION_LOCK_STALE_ENV}): a build was killed mid-way and torch would wait on it forever. "
        f"If no other process is building there, remove it (rm {lock}) and start again."
    )


def check_extension_locks(root: str, stale_s: float | None = None) -> None:
    """Raise ExtensionLockError naming a stale build lock under `root` (see `prepare_extensions_dir`)."""
    if stale_s is None:
        stale_s = _env_seconds(EXTENSION_LOCK_STALE_ENV, DEFAULT_EXTENSION_LOCK_STALE_S)
    stale = _stale_locks(root, stale_s)
    if stale:
        raise ExtensionLockError(_lock_message(*stale[0], stale_s))


@contextlib.contextmanager
def _watch_extension_locks(root: str, period_s: float = 5.0):
    """While the body runs (and may wait on another process's build), end the process with the message if a
    lock goes stale: the waiting thread is inside torch's FileBaton and cannot be interrupted."""
    stale_s = _env_seconds(EXTENSION_LOCK_STALE_ENV, DEFAULT_EXTENSION_LOCK_STALE_S)
    done = threading.Event()

    def watch():
        while not done.wait(period_s):
            stale = _stale_locks(root, stale_s)
            if stale:
                print(f"pretrain: error: {_lock_message(*stale[0], stale_s)}", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=watch, name="pretrain-extension-locks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


# ---------------------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """Each rank bumps `pretrain_heartbeat/<rank>` in the rendezvous store every timeout/10 s and watches
    rank+1's key; no change for `timeout_s` (on the watcher's own clock: no cross-node clock skew) means
    that rank is frozen or gone. Runs in a daemon thread with its own store client (its own short timeout),
    so a main thread blocked in a collective or a C++ spin-wait does not stop it."""

    PREFIX = "pretrain_heartbeat/"

    def __init__(self, host: str, port: int, rank: int, world: int, timeout_s: float):
        self.host, self.port, self.rank, self.world = host, port, rank, world
        self.timeout_s = timeout_s
        self.period_s = max(0.2, timeout_s / 10)
        self.peer = (rank + 1) % world
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pretrain-heartbeat", daemon=True)
        self.ident = f"{socket.gethostname()} pid {os.getpid()}"

    def start(self) -> Heartbeat:
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop beating and leave an `exited` mark, so the watcher of a rank that ends first (its process
        exits while the others still tear down) does not take it for a frozen one."""
        if self._stop.is_set():
            return
        self._stop.set()
        if not (dist.is_available() and dist.is_initialized()):
            return  # the group was torn down together (after a barrier): nobody is watching any more
        with contextlib.suppress(Exception):
            store = dist.TCPStore(
                self.host,
                self.port,
                is_master=False,
                timeout=datetime.timedelta(seconds=2),
                wait_for_workers=False,
            )
            store.set(f"{self.PREFIX}{self.rank}", f"exited {self.ident}")

    def _client(self):
        return dist.TCPStore(
            self.host,
            self.port,
            is_master=False,
            timeout=datetime.timedelta(seconds=max(1.0, self.period_s * 2)),
            wait_for_workers=False,
        )

    def _run(self) -> None:
        store = None
        last_value, last_change = None, time.monotonic()
        store_ok = time.monotonic()
        while not self._stop.wait(self.period_s):
            if not (dist.is_available() and dist.is_initialized()):
                return  # the group was destroyed: the run is over on this rank
            now = time.monotonic()
            try:
                store = store or self._client()
                self.count += 1
                store.set(f"{self.PREFIX}{self.rank}", f"{self.count} {self.ident}")
                key = f"{self.PREFIX}{self.peer}"
                value = store.get(key).decode() if store.check([key]) else None
                store_ok = now
            except Exception:  # the store (hosted by rank 0's launcher process) does not answer
                store = None
                if now - store_ok > self.timeout_s and not self._stop.is_set():
                    self._fail(
                        f"the rendezvous store at {self.host}:{self.port} (served by rank 0's process) has not "
                        f"answered for {now - store_ok:.0f}s: rank 0 is frozen or gone"
                    )
                continue
            if value is not None and value.startswith("exited"):
                return  # the peer finished normally
            if value != last_value:
                last_value, last_change = value, now
            elif now - last_change > self.timeout_s and not self._stop.is_set():
                who = value.split(" ", 1)[1] if value else "not started"
                self._fail(
                    f"rank {self.peer} ({who}) has sent no heartbeat for {now - last_change:.0f}s: it is "
                    "frozen (SIGSTOP, a hung device or filesystem) or gone"
                )

    def _fail(self, why: str) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        print(
            f"pretrain: error: {why} (limit {self.timeout_s:.0f}s, {HEARTBEAT_TIMEOUT_ENV}). Ending rank "
            f"{self.rank} ({self.ident}) with exit code {HEARTBEAT_EXIT_CODE} so the launcher stops the job; "
            "restart it with --resume auto once the node is healthy.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(HEARTBEAT_EXIT_CODE)


_heartbeat: Heartbeat | None = None


def start_heartbeat(timeout_s: float) -> Heartbeat | None:
    """Start this rank's heartbeat (once per process) against MASTER_ADDR:MASTER_PORT's store."""
    global _heartbeat
    if _heartbeat is not None:
        return _heartbeat
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    _heartbeat = Heartbeat(host, int(port), rank(), world_size(), timeout_s).start()
    return _heartbeat


def stop_heartbeat() -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def _named_timeout(what: str):
    """Turn a backend's timed-out collective into a CollectiveTimeoutError that names the cause."""
    try:
        yield
    except RuntimeError as err:
        if "timed out" not in str(err).lower() and "timeout" not in str(err).lower():
            raise
        raise CollectiveTimeoutError(
            f"rank {rank()}: {what} did not complete within the collective timeout ({COLLECTIVE_TIMEOUT_ENV}): "
            f"another rank is frozen, dead or waiting in a different collective ({err})"
        ) from err


def barrier() -> None:
    if world_size() > 1:
        with _named_timeout("barrier"):
            dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise max over ranks: one small collective for several flags at once."""
    t = torch.tensor(values, dtype=torch.float64, device=device() if backend_is_nccl() else "cpu")
    if world_size() > 1:
        with _named_timeout("all_reduce(max)"):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_mean(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device() if backend_is_nccl() else "cpu")
    if world_size() > 1:
        with _named_timeout("all_reduce(mean)"):
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= world_size()
    return t.tolist()


def backend_is_nccl() -> bool:
    return dist.is_initialized() and dist.get_backend() == "nccl"
