"""A checkpoint of our own engine (`pretrain train`, 2 CPU ranks, ZeRO-2, bf16) converts with no other input:
the backbone is found under `backbone.`, the model (a custom tiny size) is read from the saved run config,
and the weights equal DeepSpeed's own fp32 consolidation; the universal copy carries our per-step files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_engine_distributed import ENV

from pretrain.convert import convert, load_pretrained
from pretrain.models import create_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    from pretrain.engine.local_launch import run_local

    out = tmp_path_factory.mktemp("engine")
    args = [
        "--config", str(REPO / "configs" / "tiny_cpu.yaml"),
        "--output-dir", str(out),
        "--set", "synthetic.enabled=true",
        "--set", "synthetic.image_size=32",
        "--set", "synthetic.batch_size=4",
        "--set", "schedule.total_steps=2",
        "--set", "schedule.warmup_steps=0",
        "--set", "checkpoint.every_steps=2",
        "--set", "engine.zero_stage=2",
        "--set", "engine.precision=bf16",
    ]  # fmt: skip
    results = run_local(2, args, env=ENV, timeout=300)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.output[-4000:]}"
    return out / "checkpoints"


def test_engine_checkpoint_to_official_without_flags(engine_run, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = (engine_run / "latest").read_text().strip()
    report = convert(engine_run, tmp_path / "out.pth")  # run root: `latest` -> step dir -> DeepSpeed files
    assert report.prefix == "backbone." and report.variant == "internimage_t"
    assert (
        report.kwargs["channels"] == 16 and report.info["zero_stage"] == 2 and report.info["world_size"] == 2
    )
    weights = torch.load(tmp_path / "out.pth", weights_only=True)["model"]

    reference = get_fp32_state_dict_from_zero_checkpoint(str(engine_run), tag=tag)
    backbone = {k[len("backbone.") :]: v for k, v in reference.items() if k.startswith("backbone.")}
    assert set(weights) == set(backbone)
    for key, value in backbone.items():
        if value.is_floating_point() and weights[key].is_floating_point():
            assert weights[key].dtype == value.dtype and torch.equal(weights[key], value), key
        else:
            # integer buffers (BatchNorm's num_batches_tracked) keep the module's int64; DeepSpeed <= 0.19.7's
            # own consolidation hands them back as float32, so compare the values only.
            assert not weights[key].is_floating_point(), key
            assert torch.equal(weights[key], value.to(weights[key].dtype)), key

    kwargs = {k: report.kwargs[k] for k in ("num_classes", "channels", "depths", "groups")}
    model = create_model("internimage_t", **kwargs)
    load_pretrained(tmp_path / "out.pth", model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, backbone[key].to(value.dtype)), key


def test_engine_checkpoint_to_universal_keeps_our_files(engine_run, tmp_path):
    tag = (engine_run / "latest").read_text().strip()
    report = convert(engine_run / tag, tmp_path / "uni", to="universal")
    step_dir = tmp_path / "uni" / tag
    assert (tmp_path / "uni" / "latest_universal").read_text() == tag
    for name in ("config.yaml", "meta.json", "trainer_rank00000.pt", "trainer_rank00001.pt"):
        assert (step_dir / name).exists(), name
    assert (step_dir / "zero" / "backbone.patch_embed.conv1.weight" / "fp32.pt").exists()
    assert report.info["world_size"] == 2
