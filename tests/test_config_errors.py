"""Every bad input to `pretrain train` is one `config error:` line naming the key or file, exit 2 (issue 14).

Config-time inputs run `pretrain.cli.main` in this process (`--print-config`, so a config that loads would
print it and return 0: the test would fail). Start-up inputs (found while the trainer builds its parts: the
model's options, a manifest, `--resume`, the DeepSpeed JSON) run the real command in one subprocess, case after
case, so the process group and launcher variables they create never leak into this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_cpu.yaml")

# (id, --set overrides, fragment the one line must contain)
SET_CASES = [
    ("negative_lr", ["optim.lr=-1"], "optim.lr: must be > 0"),
    ("zero_lr", ["optim.lr=0"], "optim.lr"),
    ("grad_accum_0", ["engine.grad_accum=0"], "engine.grad_accum: must be >= 1"),
    ("synthetic_batch_0", ["synthetic.batch_size=0"], "synthetic.batch_size"),
    ("num_classes_negative", ["model.num_classes=-3"], "model.num_classes"),
    ("drop_path_1_5", ["model.drop_path_rate=1.5"], "model.drop_path_rate"),
    ("log_every_0", ["logging.every_steps=0"], "logging.every_steps"),
    ("total_steps_negative", ["schedule.total_steps=-5"], "schedule.total_steps"),
    ("warmup_negative", ["schedule.warmup_steps=-3"], "schedule.warmup_steps"),
    ("ema_decay_1_5", ["ema.decay=1.5"], "ema.decay"),
    ("keep_negative", ["checkpoint.keep=-2"], "checkpoint.keep"),
    ("lr_ref_batch_0", ["optim.lr_ref_batch=0"], "optim.lr_ref_batch"),
    ("dcn_backend_typo", ["model.dcn_backend=cudaa"], "model.dcn_backend: 'cudaa' is not one of"),
    ("zero_stage_5", ["engine.zero_stage=5"], "engine.zero_stage"),
    ("zero_stage_negative", ["engine.zero_stage=-1"], "engine.zero_stage"),
    (
        "offload_param_stage1",
        ["engine.offload_param=true"],
        "engine.offload_param: needs engine.zero_stage=3",
    ),
    (
        "offload_optimizer_stage0",
        ["engine.zero_stage=0", "engine.offload_optimizer=true"],
        "engine.offload_optimizer",
    ),
    ("max_nonfinite_0", ["engine.max_nonfinite=0"], "engine.max_nonfinite"),
    ("clip_negative", ["engine.clip_grad=-1"], "engine.clip_grad"),
    ("precision_fp8", ["engine.precision=fp8"], "engine.precision: 'fp8' is not one of"),
    ("betas_above_1", ["optim.betas=[0.9, 1.5]"], "optim.betas"),
    ("betas_one_value", ["optim.betas=[0.9]"], "optim.betas: expected 2 values"),
    ("min_lr_ratio_2", ["schedule.min_lr_ratio=2"], "schedule.min_lr_ratio"),
    ("stop_at_0", ["schedule.stop_at_step=0"], "schedule.stop_at_step"),
    ("checkpoint_every_negative", ["checkpoint.every_steps=-1"], "checkpoint.every_steps"),
    ("dcn_points_negative", ["logging.dcn_points_every=-1"], "logging.dcn_points_every"),
    ("data_batch_0", ["data.batch_size=0"], "data.batch_size"),
    ("data_views_3", ["data.views=3"], "data.views: 3 is not one of"),
    ("data_reader_typo", ["data.reader=spark"], "data.reader"),
    ("data_no_sources", ["data.sources=[]"], "data.sources"),
    (
        "data_duplicate_sources",
        ["data.sources=[{name: a, uri: x}, {name: a, uri: y}]"],
        "data.sources: names",
    ),
    ("data_weight_0", ["data.sources=[{name: a, uri: x, weight: 0}]"], "data.sources[0].weight"),
    ("data_workers_negative", ["data.num_workers=-1"], "data.num_workers"),
    ("augment_scale", ["data.augment.scale=[0.5, 2]"], "data.augment.scale"),
    ("augment_hflip", ["data.augment.hflip=2"], "data.augment.hflip"),
    ("objective_name", ["objective.name=clip"], "objective.name: 'clip' is not one of"),
    ("mix_ratio_1", ["objective.mix.ratio=1.0"], "objective.mix.ratio"),
    (
        "ema_momentum_order",
        ["objective.dense.ema_momentum=0.999", "objective.dense.ema_momentum_end=0.99"],
        "objective.dense.ema_momentum",
    ),
    ("label_prompt_prob", ["objective.semantic.label_prompt_prob=2"], "objective.semantic.label_prompt_prob"),
    ("zero_shot_topk", ["objective.zero_shot.topk=[0]"], "objective.zero_shot.topk"),
    ("dense_loss", ["objective.dense.loss=l3"], "objective.dense.loss"),
    ("unknown_key", ["optim.lrr=1"], "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
    ("unknown_section", ["engin.zero_stage=1"], "unknown config key 'engin'"),
    ("wrong_type", ["engine.zero_stage=two"], "engine.zero_stage: expected an integer"),
    ("set_without_value", ["optim.lr"], "--set expects key=value"),
    ("set_broken_yaml", ["optim.betas=[0.9"], "--set optim.betas"),
]

# (id, YAML text or None for "a directory", fragment); the fragment's {path} is the file
FILE_CASES = [
    ("missing_file", "MISSING", "config file {path} does not exist"),
    ("directory", None, "{path} is not a file"),
    ("tab_indent", "model:\n\tvariant: internimage_t\n", "{path}: line 2"),
    ("unclosed_bracket", "optim:\n  betas: [0.9, 0.95\n", "{path}:"),
    ("empty", "", "{path} is empty"),
    ("top_level_list", "- a\n- b\n", "{path}: the top level must be a mapping"),
]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    assert lines[0].startswith("pretrain train: config error: "), lines[0]
    return lines[0]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    from pretrain.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.err


@pytest.mark.parametrize("sets, fragment", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_bad_value_is_one_line_naming_the_key(sets, fragment, capsys):
    argv = ["train", "-c", TINY, "--print-config"]
    for s in sets:
        argv += ["--set", s]
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    assert fragment in one_line(err)


@pytest.mark.parametrize("text, fragment", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_config_file_is_one_line_naming_the_file(text, fragment, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    if text is None:
        path.mkdir()
    elif text != "MISSING":
        path.write_text(text)
    code, err = run_cli(["train", "-c", str(path), "--print-config"], capsys)
    assert code == 2, err
    assert fragment.format(path=path) in one_line(err)


START = """
import contextlib, io, json, sys
import torch.distributed as dist
from pretrain.cli import main

results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    # A setup that fails after creating its process group must release it (and its port).
    results[name] = [code, err.getvalue() + ("PROCESS GROUP LEFT OPEN" if dist.is_initialized() else "")]
print("RESULTS " + json.dumps(results))
"""


def _cli_env() -> dict[str, str]:
    """The environment of a `pretrain train` subprocess: no launcher variables, DeepSpeed on CPU, quiet."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return {
        **{k: v for k, v in os.environ.items() if k not in launcher},
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def test_bad_inputs_found_at_start_are_one_line_naming_the_key_or_file(tmp_path):
    base = ["train", "-c", TINY, "--set", "synthetic.enabled=true", "--set", "synthetic.image_size=32"]
    base += [
        "--set",
        "synthetic.batch_size=4",
        "--set",
        "engine.precision=fp32",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    batch = tmp_path / "batch.json"
    batch.write_text(json.dumps({"train_batch_size": 999}))
    cases = {
        "unknown_variant": (
            ["--set", "model.variant=internimage_zz"],
            "model.variant: unknown model 'internimage_zz'",
        ),
        "override_typo": (
            ["--set", "model.overrides.depthz=[1,1,1,1]"],
            "model.overrides: InternImage got an unknown option 'depthz'",
        ),
        "init_from_missing": (
            ["--set", f"model.init_from={tmp_path}/none.pth"],
            f"model.init_from: {tmp_path}/none.pth does not exist",
        ),
        "ds_json_missing": (
            ["--set", f"engine.deepspeed_config={tmp_path}/none.json"],
            "engine.deepspeed_config: cannot read",
        ),
        "ds_json_broken": (
            ["--set", f"engine.deepspeed_config={broken}"],
            f"engine.deepspeed_config: {broken} is not valid JSON",
        ),
        "ds_batch_mismatch": (
            ["--set", f"engine.deepspeed_config={batch}"],
            "engine.deepspeed_config: train_batch_size 999",
        ),
        "resume_missing": (["--resume", f"{tmp_path}/nowhere"], f"--resume {tmp_path}/nowhere"),
        "manifest_missing": (
            [
                "--set",
                "synthetic.enabled=false",
                "--set",
                f"data.sources=[{{uri: {tmp_path}/none/manifest.json}}]",
            ],
            f"data.sources: corpus manifest {tmp_path}/none/manifest.json does not exist",
        ),
    }
    argvs = {name: [*base, *extra] for name, (extra, _) in cases.items()}
    env = _cli_env()
    proc = subprocess.run(
        [sys.executable, "-c", START, json.dumps(argvs)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(line[len("RESULTS ") :])
    for name, (_, fragment) in cases.items():
        code, err = results[name]
        assert code == 2, f"{name}: exit {code}\n{err}"
        text = [x for x in err.splitlines() if "config error" in x]
        assert len(text) == 1 and fragment in text[0], f"{name}: {err}"
        assert "PROCESS GROUP LEFT OPEN" not in err, name


def test_at_least_forty_bad_inputs():
    assert len(SET_CASES) + len(FILE_CASES) + 8 >= 40


def test_resuming_a_checkpoint_of_another_model_or_stream_is_one_line(tmp_path):
    import torch

    out = tmp_path / "run"
    base = [sys.executable, "-m", "pretrain.cli", "train", "-c", TINY, "--output-dir", str(out)]
    for s in ("synthetic.enabled=true", "synthetic.image_size=32", "synthetic.batch_size=4", "engine.precision=fp32",
              "logging.dcn_points_every=0", "logging.tensorboard=false"):  # fmt: skip
        base += ["--set", s]
    env = _cli_env()

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    first = run("--set", "schedule.total_steps=1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    step = out / "checkpoints" / "step_00000001"
    resume = ["--set", "schedule.total_steps=3", "--resume", str(step)]
    cases = [
        ("other_model", ["--set", "model.overrides.channels=24"], "holds another model"),
        ("corpus_cursor", [], "its data cursor does not fit this run's stream"),
    ]
    for name, extra, fragment in cases:
        if name == "corpus_cursor":  # the rank's state as a corpus reader writes it
            state = torch.load(step / "trainer_rank00000.pt", weights_only=False)
            state["stream"] = {"version": 1, "epoch": 0, "consumed": 8, "fingerprint": "f", "epoch_len": 64}
            torch.save(state, step / "trainer_rank00000.pt")
        res = run(*resume, *extra)
        assert res.returncode == 2, f"{name}: exit {res.returncode}\n{res.stderr[-3000:]}"
        text = [x for x in res.stderr.splitlines() if "config error" in x]
        assert len(text) == 1 and fragment in text[0] and "step_00000001" in text[0], (
            f"{name}: {res.stderr[-3000:]}"
        )
