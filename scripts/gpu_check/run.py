"""The device run behind scripts/gpu_check.sh: install the carry, print device facts, build, then phases a-d.

Standard library only at the top level (it runs before anything is installed). Every step is a subprocess in
its own process group with its own timeout, all under one overall deadline: a step that hangs or crashes is
killed and reported, and the run goes on to the next. Outputs (at most 3 files, names the device tool brings
back): report.md (phase lines and every table), report.json (the same, structured), log.txt (each step's
output, the last LOG_TAIL bytes of each).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("install", "facts", "build", "a", "b", "c", "n", "d")
# Seconds each phase may take on an H200 (the sum exceeds the total on purpose: the typical run uses far less,
# and the overall deadline cuts whatever is left, so the last phase gets the slack of the earlier ones).
BUDGET = {"install": 30, "facts": 30, "build": 150, "a": 60, "b": 45, "c": 160, "n": 120, "d": 300}
TOTAL_S = 530  # under 9 minutes; the device tool allows 600 s a command
RESERVE_S = 8  # kept back for writing the report
LOG_TAIL = 400_000
FALLBACK = "using the reference op"  # pretrain.ops.cuda's warning when a shape has no compiled kernel
TITLES = {
    "install": "install .carry/",
    "facts": "device facts",
    "build": "build the DCNv3 extension (+ the DCNv4 peer)",
    "a": "kernel tests on the GPU (pytest -m gpu)",
    "b": "model check: kernel vs reference in InternImage-T and a small H-style model",
    "c": "pretrain bench dcn: T and H stage shapes at 224 px",
    "n": "ncu: each kernel's time, DRAM and L2 bytes and peak shares (T1, T2, H1, H3)",
    "d": "pretrain bench train (T, H with_cp) and the shipped H M3I recipe",
}
# The CPU smoke variant of the H model (the dry run's tiny H-style backbone).
TINY_H = "model.overrides={channels: 32, depths: [1, 1, 2, 1], groups: [1, 2, 4, 8], level2_post_norm_block_ids: [1]}"


class Run:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.out = Path(args.out).resolve()
        self.work = Path(args.work).resolve()
        self.site = self.work / "site"
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.results: dict = {
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dry_run": self.dry,
            "command": " ".join(["scripts/gpu_check.sh", *args.argv]),
            "git": _git_head(),
            "budget_s": args.budget,
            "phases": {},
        }
        self.md: dict[str, list[str]] = {}
        self.log = None
        self.capability: str | None = None
        self.fallbacks: list[str] = []
        self.background: dict[str, dict] = {}

    # ------------------------------------------------------------------ plumbing
    def env(self, **extra) -> dict:
        env = dict(os.environ)
        # the carried site first (its typing-extensions must win over an older one in the image), then the repo
        paths = ([str(self.site)] if self.site.exists() and not self.dry else []) + [str(REPO)]
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # this Python's bin first, as tests/conftest.py does: the ninja found there is part of the key of
        # DeepSpeed's cached CPU comm op, and another ninja would rebuild it (about a minute)
        env["PATH"] = os.path.dirname(self.args.python) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env["TOKENIZERS_PARALLELISM"] = "false"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["PRETRAIN_DCNV3_BUILD_DIR"] = str(self.work / "dcnv3_build")
        cutlass = self.site / "cutlass_library" / "source"
        if (cutlass / "include" / "cute" / "tensor.hpp").exists():
            env["CUTLASS_HOME"] = str(cutlass)
        if self.dry:
            env["GPU_CHECK_DRY_RUN"] = "1"
            env.setdefault("DS_ACCELERATOR", "cpu")
            env["OMP_NUM_THREADS"] = "1"  # DeepSpeed on CPU: unset, steps are ~40x slower (TOOLCHAIN.md)
            env["CUDA_VISIBLE_DEVICES"] = ""
            # DeepSpeed JIT-builds its CPU shared-memory comm op once: share the test suite's cache
            env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        else:
            env.setdefault("TORCH_EXTENSIONS_DIR", str(self.work / "torch_extensions"))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def remaining(self) -> float:
        return self.deadline - RESERVE_S - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.logw(line + "\n")

    def logw(self, text: str) -> None:
        if self.log is not None:
            self.log.write(text)
            self.log.flush()

    def pretrain(self, *argv: str) -> list[str]:
        """`pretrain ARGS` through this Python (the console script is not installed on the device)."""
        return [self.args.python, "-c", "import sys; from pretrain.cli import main; sys.exit(main())", *argv]

    def step(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> dict:
        """Run one command (own process group, killed at `timeout` or the overall deadline)."""
        return self.steps([(name, cmd, env)], timeout)[0]

    def steps(self, items, timeout: float) -> list[dict]:
        """Run commands in parallel, each killed at `timeout` (capped by the overall deadline)."""
        timeout = max(1.0, min(timeout, self.remaining()))
        handles = [self.launch(name, cmd, env) for name, cmd, env in items]
        end = time.monotonic() + timeout
        return [self.finish(h, end) for h in handles]

    def launch(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Start a command in its own process group, output to WORK/logs/NAME.log; `finish` collects it."""
        path = self.work / "logs" / f"{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "w")  # noqa: SIM115 (closed in finish)
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        kw = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
        p = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=env or self.env(),
            **kw,
        )
        return {"name": name, "p": p, "f": f, "path": path, "t0": time.monotonic()}

    def finish(self, h: dict, end: float) -> dict:
        """Wait for a launched command until `end` (monotonic; capped by the overall deadline), else kill it."""
        end = min(end, self.deadline - RESERVE_S)
        name, p = h["name"], h["p"]
        try:
            rc = p.wait(timeout=max(0.0, end - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(p)
            rc, timed_out = 124, True
        h["f"].close()
        seconds = time.monotonic() - h["t0"]
        text = h["path"].read_text(errors="replace")
        self.logw(f"\n===== {name}: rc {rc}{' (timed out)' if timed_out else ''}, {seconds:.1f} s\n")
        self.logw(text[-LOG_TAIL:] if len(text) > LOG_TAIL else text)
        # the kernel backend falls back to the reference (one warning) for shapes it has no kernel for: a
        # "cuda" row that silently measured the reference must say so
        fallbacks = sorted({ln.strip()[:200] for ln in text.splitlines() if FALLBACK in ln})
        self.fallbacks.extend(f"{name}: {f}" for f in fallbacks)
        return {
            "name": name,
            "rc": rc,
            "timed_out": timed_out,
            "seconds": round(seconds, 1),
            "tail": _tail(text),
            "fallbacks": fallbacks,
        }

    def phase(self, key: str, fn) -> None:
        if key not in self.args.phases:
            return
        t0 = time.monotonic()
        self.say(
            f"--- phase {key}: {TITLES[key]} (budget {min(BUDGET[key], max(0, self.remaining())):.0f} s)"
        )
        if self.remaining() < 5:
            status, note, detail = "failed", "no time left under the overall deadline", {}
        else:
            try:
                status, note, detail = fn(min(BUDGET[key], self.remaining()))
            except Exception as err:  # a bug in this script must not cost the remaining phases
                status, note, detail = "failed", f"gpu_check error: {type(err).__name__}: {err}", {}
        seconds = time.monotonic() - t0
        if self.fallbacks:
            fell = [f"kernel fell back to the reference: {f}" for f in self.fallbacks]
            note = "; ".join([note] * bool(note) + fell)
            self.fallbacks = []
        self.results["phases"][key] = {"status": status, "seconds": round(seconds, 1), "note": note, **detail}
        self.say(f"phase {key}: {status} ({seconds:.1f} s){': ' + note if note else ''}")

    # ------------------------------------------------------------------ phases
    def install(self, budget):
        carry = REPO / ".carry"
        if not carry.is_dir() or not any(carry.iterdir()):
            if self.dry:
                return "skipped", "no .carry/ here (run scripts/gpu_carry.sh; CI has none)", {}
            return (
                "failed",
                "no .carry/: run scripts/gpu_carry.sh on the CPU machine and carry ['.carry']",
                {},
            )
        verify = self.step(
            "carry-verify", [self.args.python, "scripts/gpu_check/carry.py", "verify", ".carry"], 30
        )
        if self.dry:
            # the carried wheels are for the device's Python 3.12; here they are only checked, not installed
            ok = verify["rc"] == 0
            return ("ok" if ok else "failed"), "dry run: .carry/ verified, not installed", {"verify": verify}
        self.site.mkdir(parents=True, exist_ok=True)
        wheels = sorted(str(p) for p in carry.glob("*.whl"))
        res = self.step(
            "install",
            [self.args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(self.site), *wheels],
            budget,
        )  # fmt: skip
        detail = {"wheels": [Path(w).name for w in wheels], "site": str(self.site), "verify": verify}
        if res["rc"] != 0:
            return "failed", f"pip install rc {res['rc']}: {res['tail'][-300:]}", detail
        note = f"{len(wheels)} wheels into {self.site}"
        if verify["rc"] != 0:  # installed, but a dependency may be missing: say which before it bites
            note += "; carry check: " + _last_error(verify["tail"])
        return "ok", note, detail

    def facts(self, budget):
        path = self.work / "facts.json"
        path.unlink(missing_ok=True)
        res = self.step("facts", [self.args.python, "scripts/gpu_check/facts.py", str(path)], budget)
        facts = json.loads(path.read_text()) if path.exists() else {}
        self.results["facts"] = facts
        self.capability = facts.get("capability")
        lines = ["| fact | value |", "|---|---|"]
        for k, v in facts.items():
            if k == "packages":
                v = ", ".join(f"{n} {ver}" for n, ver in v.items())
            lines.append(f"| {k} | {str(v).replace('|', '/')} |")
        self.md["facts"] = lines
        for line in res["tail"].splitlines():
            if line.split(":")[0] in (
                "python",
                "gpu",
                "capability",
                "gpu_mem_gib",
                "nvidia_smi",
                "nvcc",
                "problems",
            ):
                self.say("  " + line)
        if res["rc"] != 0:
            return "failed", "; ".join(facts.get("problems", [])) or res["tail"][-300:], {}
        return "ok", "", {}

    def build(self, budget):
        if self.dry:
            return "skipped", "dry run: the CUDA extension needs a GPU and a CUDA torch", {}
        if self.capability is None:  # facts not run (a rerun of a subset): ask torch
            probe = self.step(
                "capability",
                [self.args.python, "-c", "import torch; print('%d.%d' % torch.cuda.get_device_capability())"],
                30,
            )
            self.capability = probe["tail"].strip().splitlines()[-1] if probe["rc"] == 0 else None
        # one arch: the build's default (sm_80 and sm_90a) would compile every unit twice
        arch = {"9.0": "90a", "8.0": "80", "8.6": "80", "8.9": "80"}.get(self.capability or "", None)
        cores = os.cpu_count() or 4
        ext_cmd = [self.args.python, "-m", "pretrain.ops.build", "--quiet"] + (
            ["--arch", arch] if arch else []
        )
        sdists = sorted((REPO / ".carry").glob("DCNv4-*.tar.gz"))
        notes = []
        if "c" not in self.args.phases:
            notes.append("DCNv4 not built (phase c not run)")
        elif not self.args.peer:
            # its build took over 175 s on an H200 beside ours (2026-11-30): a run of its own, --phases build,c --peer
            notes.append("DCNv4 not built (no --peer)")
        elif (self.site / "DCNv4").is_dir():
            notes.append("DCNv4 already built (an earlier run on this machine)")
        elif sdists:
            # the peer builds with 4 cores in the background, into the carried site; phase c waits for it
            cap = self.capability or "9.0"
            self.background["build-dcnv4"] = self.launch(
                "build-dcnv4",
                [self.args.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                 "--no-cache-dir", "--target", str(self.site), str(sdists[0])],
                self.env(MAX_JOBS=4, TORCH_CUDA_ARCH_LIST=cap),
            )  # fmt: skip
            notes.append("DCNv4 building in the background (phase c waits for it)")
        else:
            notes.append("no DCNv4 sdist in .carry/: bench dcn runs without the peer")
        res = self.step("build-dcnv3", ext_cmd, budget, self.env(MAX_JOBS=max(1, cores - 4)))
        notes.insert(
            0, f"extension {'ok' if res['rc'] == 0 else 'FAILED rc ' + str(res['rc'])} ({res['seconds']} s)"
        )
        if res["rc"] != 0:
            notes.insert(1, "extension: " + _last_error(res["tail"]))
        return ("ok" if res["rc"] == 0 else "failed"), "; ".join(notes), {"arch": arch, "extension": res}

    def join_dcnv4(self, budget: float) -> str:
        """Wait (at most `budget` s) for the background DCNv4 build; a note when it failed."""
        h = self.background.pop("build-dcnv4", None)
        if h is None:
            return ""
        res = self.finish(h, time.monotonic() + budget)
        self.results["phases"].setdefault("build", {})["dcnv4"] = res
        self.say(f"  DCNv4 build: {'ok' if res['rc'] == 0 else 'FAILED'} ({res['seconds']} s)")
        return "" if res["rc"] == 0 else f"DCNv4 build failed ({_last_error(res['tail'])}): no peer rows"

    def phase_a(self, budget):
        xml = self.work / "kernel_tests.xml"
        xml.unlink(missing_ok=True)
        if not self.dry:
            # a missing or broken extension must fail this phase, not skip every test
            probe = self.step(
                "a-extension",
                [self.args.python, "-c", "import torch; from pretrain.ops import cuda; "
                 "r = cuda.unavailable_reason(torch.empty(1, device='cuda')); print(r or 'ok'); raise SystemExit(bool(r))"],
                min(60, budget),
            )  # fmt: skip
            if probe["rc"] != 0:
                return "failed", "the extension is not usable: " + _last_error(probe["tail"]), {}
        # the files that hold GPU tests (collecting the whole suite would import Ray, which the device lacks)
        files = sorted(
            str(f.relative_to(REPO))
            for f in (REPO / "tests").glob("test_*.py")
            if "mark.gpu" in f.read_text()
        )
        res = self.step(
            "a-pytest",
            [self.args.python, "-m", "pytest", "-q", "-m", "gpu", *files, "-p", "no:cacheprovider", "-o", "addopts=",
             f"--junitxml={xml}"],
            budget,
        )  # fmt: skip
        summary = _junit(xml)
        self.results["kernel_tests"] = summary
        lines = [f"pytest: {summary.get('tests', 0)} tests, {summary.get('failures', 0)} failures, "
                 f"{summary.get('errors', 0)} errors, {summary.get('skipped', 0)} skipped ({res['seconds']} s)"]  # fmt: skip
        for f in summary.get("failed", [])[:30]:
            lines.append(f"- FAILED `{f['test']}`: {f['message']}")
        self.md["a"] = lines
        if res["timed_out"]:
            return "failed", f"timed out after {res['seconds']} s", summary
        if self.dry:
            if summary.get("tests", 0) and summary.get("skipped") == summary.get("tests"):
                return (
                    "skipped",
                    f"dry run: no CUDA device ({summary['tests']} GPU tests collected, all skipped)",
                    {},
                )
            return "failed", f"dry run: expected every GPU test to skip, got {summary}", {}
        if summary.get("tests", 0) == 0:
            return "failed", "pytest ran no test: " + res["tail"][-300:], {}
        bad = summary.get("failures", 0) + summary.get("errors", 0)
        if bad or summary.get("skipped", 0) or res["rc"] != 0:
            return "failed", lines[0], {}
        return "ok", lines[0], {}

    def phase_b(self, budget):
        out_md, out_json = self.work / "model_check.md", self.work / "model_check.json"
        for stale in (out_md, out_json):  # a file left by an earlier run must not pass for this one's
            stale.unlink(missing_ok=True)
        argv = ["bench", "model", "--out", str(out_md), "--json", str(out_json)]
        if self.dry:
            argv += ["--tiny", "--candidate", "reference"]
        res = self.step("b-model", self.pretrain(*argv), budget)
        if out_json.exists():
            self.results["model_check"] = json.loads(out_json.read_text())
        self.md["b"] = (
            out_md.read_text().splitlines() if out_md.exists() else [f"no table: {_last_error(res['tail'])}"]
        )
        note = "dry run: CPU, tiny models, the reference as candidate (plumbing only)" if self.dry else ""
        if res["rc"] != 0:
            bad = [
                f"{r['model']} {r['dtype']} {r['backend']}{' (' + r['note'][:120] + ')' if r.get('note') else ''}"
                for r in self.results.get("model_check", {}).get("rows", [])
                if r.get("pass") is False
            ]
            if res["timed_out"]:
                why = "timed out"
            elif bad:
                why = "outside the 2x-reference bound or fell back: " + "; ".join(bad)
            else:
                why = _last_error(res["tail"])
            return "failed", why, {}
        return "ok", note, {}

    def phase_c(self, budget):
        if self.dry:
            runs = [("c-dcn", ["--allow-cpu", "--models", "t", "--stages", "4", "--dtypes", "fp32", "--image-size", "32",
                               "--warmup", "1", "--iters", "1"], 1.0)]  # fmt: skip
        else:
            # the batch fills the GPU (up to 1024 images), so one call is 10-100 ms: 5 timed calls after 2 warm-up
            # ones per number. bench dcn prints its table only at the end, so a run killed at its timeout loses
            # all its rows: four runs, and torch.compile (which recompiles per shape) last and per model, so a
            # slow compile costs only its own rows.
            # bf16 first (the training dtype), each shape's slowest kernels listed (--profile); fp32 and the peer
            # after; torch.compile last and per model, so a slow compile costs only its own rows.
            common = ["--image-size", "224", "--warmup", "2", "--iters", "5"]
            impls = "kernel,kernel-split,kernel-8w,reference" + (",dcnv4" if self.args.peer else "")
            runs = [
                ("c-dcn-t", ["--models", "t", "--impls", impls, "--dtypes", "bf16", "--profile", "6", *common], 0.17),
                # grad wpack in the backward's persistent CTAs against its GEMM: only T stages 1-3 and H stage 1
                # take that path (T3 and H1 in clusters of 8 CTAs)
                ("c-dcn-t-wpack", ["--models", "t", "--stages", "1,2,3", "--impls", "kernel,kernel-wpack-gemm",
                                   "--dtypes", "bf16", "--profile", "6", *common], 0.08),
                ("c-dcn-h-wpack", ["--models", "h", "--stages", "1", "--impls", "kernel,kernel-wpack-gemm",
                                   "--dtypes", "bf16", "--profile", "6", *common], 0.04),
                # the one-launch backward recomputes a halo that grows with the offsets' spread; the touch masks
                # skip the part of it that cannot scatter into the tile: with and without them, at the default
                # 1-pixel offsets and at zero offsets (a freshly initialised block)
                ("c-dcn-halo", ["--models", "t,h", "--stages", "1,2", "--impls", "kernel,kernel-no-masks",
                                "--dtypes", "bf16", *common], 0.05),
                ("c-dcn-offsets0", ["--models", "t,h", "--stages", "1,2", "--impls", "kernel,kernel-no-masks",
                                    "--dtypes", "bf16", "--offset-std", "0", *common], 0.05),
                # grad_y (by a GEMM) and the forward's logits stored and read back (HBM bytes) against their
                # recompute in the backward's own tile and halo (tensor-core work): BENCHMARKS step 29's model has
                # stored win where the kernel waits on its mma (H2, H3) and lose where it waits on HBM (T1, T2)
                ("c-dcn-stored", ["--models", "t,h", "--stages", "1,2,3", "--impls",
                                  "kernel,kernel-stored-grad-y,kernel-stored-logits,kernel-stored-both",
                                  "--dtypes", "bf16", *common], 0.08),
                ("c-dcn-h", ["--models", "h", "--impls", impls, "--dtypes", "bf16", "--profile", "6", *common], 0.20),
                ("c-dcn-fp32", ["--models", "t,h", "--stages", "1", "--impls", impls, "--dtypes", "fp32", *common], 0.10),
                ("c-dcn-compiled-t", ["--models", "t", "--impls", "compiled", "--dtypes", "bf16", *common], 0.15),
                ("c-dcn-compiled-h", ["--models", "h", "--impls", "compiled", "--dtypes", "bf16", *common], 0.25),
            ]  # fmt: skip
        runs = [r for r in runs if r[0] not in self.args.skip]
        tables, rows, failed = [], [], []
        t0 = time.monotonic()
        peer = self.join_dcnv4(budget * 0.4)  # a peer that did not build is a note, not a failure of ours
        for i, (name, argv, share) in enumerate(runs):
            left = budget - (time.monotonic() - t0)
            # a run's share of the phase, plus whatever earlier runs left unused
            later = sum(s for _, _, s in runs[i + 1 :])
            timeout = left * share / (share + later)
            out_md = self.work / f"{name}.md"
            out_md.unlink(missing_ok=True)
            res = self.step(name, self.pretrain("bench", "dcn", *argv, "--out", str(out_md)), timeout)
            if out_md.exists():
                text = out_md.read_text()
                tables.append(text)
                rows.extend({"run": name, **r} for r in _md_rows(text))
            if res["rc"] != 0:
                failed.append(f"{name}: " + ("timed out" if res["timed_out"] else _last_error(res["tail"])))
        self.results["dcn"] = rows
        self.md["c"] = "\n\n".join(tables).splitlines() or ["no table"]
        errors = [r for r in rows if r.get("note", "").startswith(("error", "OOM"))]
        notes = failed + [f"{len(errors)} rows with errors/OOM"] * bool(errors) + [peer] * bool(peer)
        if self.dry:
            notes.insert(0, "dry run: CPU, reference only, one tiny shape")
        return ("failed" if failed else "ok"), "; ".join(notes), {}

    def phase_n(self, budget):
        """Nsight Compute on one warmed-up forward + backward per shape (scripts/gpu_check/ncu_block.py): whether
        the kernels are bound by L2, HBM or the tensor cores. Needs ncu and a runtime that lets it read the counters
        (Firecracker machines did; gVisor refused, KINDS.md): otherwise a note, not a failure."""
        sys.path.insert(0, str(REPO / "scripts" / "gpu_check"))
        import ncu_block

        if self.dry:
            return "skipped", "dry run: no GPU counters", {}
        ncu = shutil.which("ncu") or next(
            iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None
        )
        if ncu is None:
            return "skipped", "no ncu on this machine", {}
        shapes = [("t", 1, 64), ("h", 1, 16), ("h", 3, 64), ("t", 2, 128)]  # the first two say the most
        tables, notes, found = [], [], {}
        t0 = time.monotonic()
        for i, (model, stage, batch) in enumerate(shapes):
            name = f"n-ncu-{model}{stage}"
            left = budget - (time.monotonic() - t0)
            if left < 20:
                notes.append(f"{name}: no time left")
                continue
            workload = [
                self.args.python,
                "scripts/gpu_check/ncu_block.py",
                "run",
                model,
                str(stage),
                str(batch),
            ]
            for metrics in (ncu_block.METRICS, ncu_block.METRICS_MIN):
                csv_path = self.work / f"{name}.csv"
                csv_path.unlink(missing_ok=True)
                cmd = [str(ncu), "--target-processes", "all", "--profile-from-start", "off", "--clock-control", "none",
                       "--csv", "--page", "raw", "--print-units", "base", "--kernel-name", ncu_block.KERNELS,
                       "--metrics", ",".join(metrics), "--log-file", str(csv_path), *workload]  # fmt: skip
                res = self.step(name, cmd, left / (len(shapes) - i))
                text = csv_path.read_text(errors="replace") if csv_path.exists() else ""
                kernels = ncu_block.parse(text)
                if kernels or "metric" not in (text + res["tail"]).lower():
                    break  # done, or a failure that fewer metrics would not cure
            if not kernels:
                why = "timed out" if res["timed_out"] else _last_error(text + "\n" + res["tail"])
                notes.append(f"{name}: no counters ({why})")
                if any(
                    s in text + res["tail"] for s in ("LibraryNotLoaded", "ERR_NVGPUCTRPERM", "not supported")
                ):
                    break  # this runtime does not give ncu the counters: the other shapes would not either
                continue
            found[name] = kernels
            tables.append(
                "\n".join(ncu_block.table(f"{model.upper()} stage {stage}, batch {batch}", kernels))
            )
        self.results["ncu"] = found
        self.md["n"] = "\n\n".join(tables).splitlines() or ["no counters"]
        return ("ok" if found else "failed"), "; ".join(notes), {}

    def phase_d(self, budget):
        adam = self.work / "torch_adamw.json"
        adam.write_text(json.dumps({"optimizer": {"params": {"torch_adam": True, "fused": True}}}))
        if self.dry:
            # one process for both tiny models (each process pays ~4 s of imports on a CI core)
            runs = [
                ("d-train", ["--tiny", "--models", "internimage_t", "internimage_h", "--steps", "1", "--warmup", "1",
                             "--batch-size", "auto", "--set", TINY_H], 0.5),
            ]  # fmt: skip
        else:
            # the kernel first: it is the figure this run exists for; H's backends in two processes, so that a
            # crash or a timeout in one keeps the other's row
            t = [
                "--models",
                "internimage_t",
                "--batch-size",
                "auto",
                "--max-batch",
                "1024",
                "--warmup",
                "3",
                "--steps",
                "5",
            ]
            h = ["--models", "internimage_h", "--with-cp", "--batch-size", "auto", "--max-batch", "128", "--warmup", "1",
                 "--steps", "3"]  # fmt: skip
            runs = [
                ("d-train-t", [*t, "--backends", "cuda", "reference"], 0.22),
                ("d-train-h-cuda", [*h, "--backends", "cuda"], 0.2),
                ("d-train-h-reference", [*h, "--backends", "reference"], 0.18),
            ]
        runs = [r for r in runs if r[0] not in self.args.skip]
        rows, failed = [], []
        t0 = time.monotonic()
        shares = [s for _, _, s in runs] + [0.4] * ("d-recipe" not in self.args.skip)  # the recipe's share
        for i, (name, argv, share) in enumerate(runs):
            left = budget - (time.monotonic() - t0)
            timeout = left * share / sum(shares[i:])
            out_json = self.work / f"{name}.json"
            out_json.unlink(missing_ok=True)
            res = self.step(name, self.pretrain("bench", "train", *argv, "--json", str(out_json)), timeout)
            if out_json.exists():
                rows.extend(json.loads(out_json.read_text()))
            if res["rc"] != 0:
                failed.append(f"{name}: " + ("timed out" if res["timed_out"] else _last_error(res["tail"])))
        self.results["train"] = rows
        recipe, note = {}, ""
        if "d-recipe" not in self.args.skip:
            recipe, note = self.recipe(budget - (time.monotonic() - t0), adam)
        self.results["recipe"] = recipe
        if note:
            failed.append("recipe: " + note)
        self.md["d"] = _train_md(rows) + [""] + _recipe_md(recipe)
        notes = (["dry run: CPU, tiny models, fp32/bf16"] if self.dry else []) + failed
        return ("failed" if failed else "ok"), "; ".join(notes), {}

    def recipe(self, budget: float, adam: Path) -> tuple[dict, str]:
        """configs/internimage_h_m3i_427m.yaml itself for a few steps (ZeRO-3, bf16, text tower, EMA teacher,
        mixing) on the generated sample corpus read by the arrow reader (Ray is not on the device)."""
        t0 = time.monotonic()
        sample = self.work / ("sample-dry" if self.dry else "sample")  # the dry run's tokenizer is tiny
        run_dir = self.work / "recipe"
        shutil.rmtree(run_dir, ignore_errors=True)
        size = ["--num", "128", "--size", "48"] if self.dry else ["--num", "768", "--size", "64", "96"]
        if not (sample / "train" / "manifest.json").exists():
            res = self.step(
                "d-recipe-data", self.pretrain("data", "sample", str(sample), *size), min(60, budget)
            )
            if res["rc"] != 0:
                return {}, "sample corpus: " + _last_error(res["tail"])
        sets = [
            f"output_dir={run_dir}", f"data.sources=[{{name: sample, uri: {sample}/train/manifest.json, weight: 1.0}}]",
            "data.reader=arrow", f"objective.text.tokenizer={sample}/tokenizer.json", "objective.text.train_if_missing=true",
            "objective.zero_shot.every_steps=0", "schedule.total_steps=6", "schedule.warmup_steps=1",
            "checkpoint.every_steps=0", "checkpoint.save_final=false", "checkpoint.save_on_signal=false",
            "logging.every_steps=1", "logging.tensorboard=false", "logging.dcn_points_every=0",
            f"engine.deepspeed_config={adam}",
        ]  # fmt: skip
        if self.dry:
            sets += [
                "data.num_workers=1", "data.batch_size=4", "data.image_size=64", "schedule.total_steps=2", TINY_H,
                "objective.text.width=64", "objective.text.depth=1", "objective.text.heads=4",
                "objective.text.context_length=24", "objective.text.vocab_size=400", "objective.dense.decoder_width=64",
                "objective.dense.decoder_depth=1", "objective.dense.decoder_heads=4", "objective.dense.projector_dim=32",
                "objective.mix.min_block=2",
            ]  # fmt: skip
        else:
            sets += ["data.num_workers=8"]
        argv = ["train", "--config", "configs/internimage_h_m3i_427m.yaml"]
        for s in sets:
            argv += ["--set", s]
        # launches synchronous: a kernel fault is raised at the op that launched it, with its Python stack (the first
        # H200 run ended in an asynchronous "misaligned address" that named no op)
        env = self.env() if self.dry else self.env(CUDA_LAUNCH_BLOCKING=1)
        res = self.step("d-recipe", self.pretrain(*argv), budget - (time.monotonic() - t0), env)
        metrics = []
        path = run_dir / "metrics.jsonl"
        if path.exists():
            metrics = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        summary = _recipe_summary(metrics)
        summary["seconds"] = res["seconds"]
        if res["rc"] != 0:
            return summary, ("timed out" if res["timed_out"] else _last_error(res["tail"]))
        if not metrics:
            return summary, "no metrics.jsonl written"
        return summary, ""

    # ------------------------------------------------------------------ report
    def report(self, final: bool = True) -> None:
        """Write report.md and report.json (after every phase too: a run killed from outside keeps them);
        `final` also prints the phase summary last, where the device tool's output tail shows it."""
        total = time.monotonic() - self.start
        self.results["total_s"] = round(total, 1)
        r = self.results
        facts = r.get("facts", {})
        lines = [
            f"# GPU check{' (DRY RUN on CPU: plumbing only, no GPU figures)' if self.dry else ''}",
            "",
            f"{r['date']}, {facts.get('gpu', 'no GPU')}, torch {facts.get('packages', {}).get('torch', '?')}, "
            f"git {r['git']}, `{r['command']}`, {total:.0f} s of a {self.args.budget} s budget.",
            "",
            "| phase | what | status | seconds | note |",
            "|---|---|---|---|---|",
        ]
        for key in PHASES:
            p = r["phases"].get(key)
            if p is None:
                continue
            note = str(p["note"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {key} | {TITLES[key]} | {p['status']} | {p['seconds']} | {note} |")
        for key, title in (("facts", "Device facts"), ("a", "a. Kernel tests"), ("b", "b. Model check"),
                           ("c", "c. DCN block benchmark"), ("n", "n. Hardware counters (ncu)"),
                           ("d", "d. Train step")):  # fmt: skip
            if key in self.md:
                lines += ["", f"## {title}", "", *self.md[key]]
        (self.out / "report.md").write_text("\n".join(lines) + "\n")
        (self.out / "report.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        if not final:
            return
        print()
        for key in PHASES:
            p = r["phases"].get(key)
            if p is not None:
                print(
                    f"phase {key}: {p['status']} ({p['seconds']} s){': ' + str(p['note'])[:300] if p['note'] else ''}"
                )
        print(f"gpu_check: {total:.0f} s; report in {self.out}/report.md, report.json, log.txt")

    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "log.txt", "w")  # noqa: SIM115
        self.say(f"gpu_check {'--dry-run ' if self.dry else ''}phases {','.join(self.args.phases)}; out {self.out}; "
                 f"work {self.work}; python {self.args.python}; budget {self.args.budget} s")  # fmt: skip
        for key, fn in (("install", self.install), ("facts", self.facts), ("build", self.build), ("a", self.phase_a),
                        ("b", self.phase_b), ("c", self.phase_c), ("n", self.phase_n),
                        ("d", self.phase_d)):  # fmt: skip
            self.phase(key, fn)
            self.report(final=False)
        for h in self.background.values():  # nothing outlives the run
            self.finish(h, time.monotonic())
        self.report()
        self.log.close()
        failed = [k for k, p in self.results["phases"].items() if p["status"] == "failed"]
        return 1 if failed else 0


# ---------------------------------------------------------------------- helpers


def _kill_group(p: subprocess.Popen) -> None:
    """SIGTERM to the step's process group, SIGKILL after 5 s (only processes this run started)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _last_error(tail: str) -> str:
    """The most telling line of a failed step's output: the last exception or error line."""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"(Error|Exception|error:|FAILED|Killed|Traceback)", ln):
            return ln[:300]
    return (lines[-1] if lines else "no output")[:300]


def _junit(path: Path) -> dict:
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"] = []
    for case in suite.iter("testcase"):
        for tag in ("failure", "error"):
            el = case.find(tag)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                out["failed"].append({"test": case.get("name"), "message": (msg[0] if msg else "")[:300]})
    return out


def _md_rows(text: str) -> list[dict]:
    """Rows of the Markdown table(s) in `text` as dicts keyed by the header."""
    rows, head = [], None
    for line in text.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif set("".join(cells)) <= set("-: "):
            continue
        else:
            rows.append(dict(zip(head, cells)))
    return rows


def _train_md(rows: list[dict]) -> list[str]:
    """`pretrain bench train` rows (its JSON) as one table, with how each batch was chosen."""
    if not rows:
        return ["pretrain bench train: no row completed."]

    def num(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "| model | DCN backend | px | batch | prec | ZeRO | with_cp | step (s) | samples/s | TFLOP/s | MFU | peak mem (GiB) | batch search |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['backend']} |" + " |" * 10 + f" FAILED: {r['error'][:200]} |")
            continue
        search = r.get("batch_search")
        how = (
            f"predicted max {search['predicted_max']} ({search['gib_per_sample']:.2f} GiB/sample + "
            f"{search['fixed_gib'] + search['optimizer_gib']:.1f} GiB){', OOM retry' if search.get('retried') else ''}"
            if search
            else "fixed"
        )
        mfu = None if r.get("mfu") is None else 100 * r["mfu"]
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['img']} | {r['batch/device']} | {r['precision']} | {r['zero']} | "
            f"{r.get('with_cp')} | {num(r['step_s'], '.3f')} | {num(r['samples/s'], '.1f')} | "
            f"{num(r.get('tflops/device'), '.1f')} | {num(mfu, '.1f')}% | {num(r['mem_gib'], '.1f')} | {how} |"
        )
    return lines


def _recipe_summary(metrics: list[dict]) -> dict:
    if not metrics:
        return {"steps": 0}
    steady = metrics[2:] or metrics[-1:]  # the first steps include allocator and cuDNN warm-up

    def mean(key):
        vals = [m[key] for m in steady if isinstance(m.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    return {
        "steps": len(metrics),
        "losses": {
            k: [round(m[k], 4) for m in metrics if k in m] for k in metrics[-1] if k.startswith("loss/")
        },
        "step_time_s": mean("perf/step_time_s"),
        "samples_per_s": mean("perf/samples_per_s"),
        "tflops_per_device": mean("perf/tflops_per_device"),
        "mfu": mean("perf/mfu"),
        "data_wait_frac": mean("perf/data_wait_frac"),
        "max_allocated_gib": max((m.get("memory/max_allocated_gib") or 0.0) for m in metrics) or None,
        "host_max_rss_gib": max((m.get("memory/host_max_rss_gib") or 0.0) for m in metrics) or None,
    }


def _recipe_md(s: dict) -> list[str]:
    if not s or not s.get("steps"):
        return ["Recipe (configs/internimage_h_m3i_427m.yaml): no step completed."]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    mfu = None if s["mfu"] is None else 100 * s["mfu"]
    lines = [
        "Recipe `configs/internimage_h_m3i_427m.yaml` (ZeRO-3, bf16, with_cp, text tower, EMA teacher, mixing; "
        "sample corpus, arrow reader, torch AdamW, schedule cut to a few steps):",
        "",
        "| steps | step (s) | samples/s | TFLOP/s/dev | MFU | data wait | peak GPU mem (GiB) | host RSS (GiB) |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['steps']} | {fmt(s['step_time_s'], '.3f')} | {fmt(s['samples_per_s'], '.1f')} | "
        f"{fmt(s['tflops_per_device'], '.1f')} | {fmt(mfu, '.1f')}% | "
        f"{fmt(s['data_wait_frac'], '.2f')} | {fmt(s['max_allocated_gib'], '.1f')} | {fmt(s['host_max_rss_gib'], '.1f')} |",
        "",
    ]
    for k, v in s.get("losses", {}).items():
        lines.append(f"- {k}: {', '.join(map(str, v))}")
    return lines


def _git_head() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()  # fmt: skip
        return res.stdout.strip() + ("+dirty" if dirty else "") if res.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", help="output folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU: the same plumbing, tiny shapes, GPU phases skipped"
    )
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)}")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S", TOTAL_S)),
                        help=f"overall seconds (default {TOTAL_S}, or $GPU_CHECK_BUDGET_S)")  # fmt: skip
    parser.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/gpu_check"),
                        help="scratch: installed carry, builds, sample corpus, step logs")  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="the Python that runs every step")
    parser.add_argument("--skip", type=lambda v: {x for x in v.split(",") if x}, default=set(),
                        help="comma list of steps of phases c and d to leave out (c-dcn-fp32, d-train-h-reference, "
                        "d-recipe, ...: their names in log.txt), for a rerun that needs only the rest")  # fmt: skip
    parser.add_argument("--peer", action="store_true",
                        help="also build DCNv4 from .carry/ (minutes) and bench it in phase c")  # fmt: skip
    args = parser.parse_args(argv)
    args.argv = argv
    # absolute, so every step (any cwd) runs the same interpreter and its bin dir can go first on PATH
    args.python = (
        os.path.abspath(args.python) if os.sep in args.python else shutil.which(args.python) or args.python
    )
    args.out = args.out or os.environ.get("OUT") or str(REPO / "runs" / "gpu_check")
    args.phases = [p for p in args.phases.split(",") if p]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {','.join(PHASES)}")
    return Run(args).main()


if __name__ == "__main__":
    sys.exit(main())
