"""Parameter groups (official semantics), the lr schedule and the generated DeepSpeed config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from torch import nn

from pretrain.config import OptimConfig, ScheduleConfig, load_config
from pretrain.engine.ds_config import build_ds_config, merge
from pretrain.engine.optim import lr_factor, param_groups, peak_lr
from pretrain.models import create_model, lr_decay_ratios

REPO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml")
TINY = dict(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=10)


class _Obj(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = create_model("internimage_t", **TINY)
        self.teacher = create_model("internimage_t", **TINY)
        self.proj = nn.Linear(4, 4)

    def frozen_module_names(self):
        return ("teacher",)


def _where(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_no_decay_on_1d_and_bias_and_frozen_teacher_excluded():
    obj = _Obj()
    groups = param_groups(obj, OptimConfig(weight_decay=0.05))
    where = _where(groups)
    teacher_ids = {id(p) for p in obj.teacher.parameters()}
    assert not teacher_ids & set(where)
    for name, p in obj.named_parameters():
        if name.startswith("teacher."):
            continue
        expect = 0.0 if (p.ndim <= 1 or name.endswith(".bias")) else 0.05
        assert where[id(p)]["weight_decay"] == expect, name


def test_layer_decay_and_dcn_multiplier_follow_the_official_tables():
    from pretrain.models import DCN_LR_KEYWORDS, lr_scale

    obj = _Obj()
    cfg = OptimConfig(layer_decay=0.9, dcn_lr_mul=0.1)
    where = _where(param_groups(obj, cfg))
    ratios = lr_decay_ratios(obj.backbone, 0.9)
    for name, p in obj.backbone.named_parameters():
        expect = lr_scale(name, ratios) * (0.1 if any(k in name for k in DCN_LR_KEYWORDS) else 1.0)
        assert where[id(p)]["lr_scale"] == pytest.approx(expect), name
    # deepest block at 1, stem at decay**(blocks - 1); heads outside the backbone stay at 1
    assert where[id(obj.backbone.patch_embed.conv1.weight)]["lr_scale"] == pytest.approx(0.9**4)
    assert where[id(obj.proj.weight)]["lr_scale"] == 1.0


def test_schedule_warmup_then_cosine():
    s = ScheduleConfig(total_steps=110, warmup_steps=10, warmup_init_ratio=0.1, min_lr_ratio=0.01)
    assert lr_factor(0, s) == pytest.approx(0.1)
    assert lr_factor(5, s) == pytest.approx(0.55)
    assert lr_factor(10, s) == pytest.approx(1.0)
    assert lr_factor(60, s) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(110, s) == pytest.approx(0.01)
    values = [lr_factor(i, s) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert math.isclose(peak_lr(OptimConfig(lr=5e-4, lr_ref_batch=512), 1024), 1e-3)
    assert peak_lr(OptimConfig(lr=5e-4, lr_ref_batch=None), 1024) == 5e-4


def test_ds_config_from_ours_and_raw_override(tmp_path):
    raw = tmp_path / "ds.json"
    raw.write_text(
        json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}, "steps_per_print": 7})
    )
    cfg = load_config(
        overrides=[
            "engine.zero_stage=3",
            "engine.grad_accum=4",
            "engine.precision=bf16",
            f"engine.deepspeed_config={raw}",
        ]
    )
    ds = build_ds_config(cfg, micro_batch=8, world_size=2, lr=1e-3)
    assert ds["train_batch_size"] == 64 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["gradient_clipping"] == 5.0 and ds["steps_per_print"] == 7
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}


def test_offload_param_needs_stage3():
    with pytest.raises(ValueError, match=r"engine\.offload_param: needs engine\.zero_stage=3"):
        load_config(overrides=["engine.offload_param=true"])


def test_model_init_from_goes_through_pretrain_convert(tmp_path):
    import torch

    from pretrain.engine.build import build_model

    torch.manual_seed(1)
    src = build_model(load_config(REPO_CONFIG))
    torch.save({"model": src.state_dict()}, tmp_path / "w.pth")  # the official .pth layout
    torch.manual_seed(2)
    dst = build_model(load_config(REPO_CONFIG, [f"model.init_from={tmp_path / 'w.pth'}"]))
    for (name, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp16_on_a_device_without_it_is_a_config_error(tmp_path, capsys, monkeypatch):
    import torch
    from deepspeed.accelerator import get_accelerator

    from pretrain.cli import main

    if torch.cuda.is_available():
        pytest.skip("the GPU's accelerator supports fp16")
    # DeepSpeed's CPU accelerator has fp16 where oneDNN does (CPUs with AVX512-FP16 or AMX-FP16): the check must
    # hold on a CPU without it, which this run may not be.
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
    # The synthetic stream: the check must not depend on a sample corpus built in the checkout by an earlier test.
    args = [
        "train",
        "--config",
        str(config),
        "--output-dir",
        str(tmp_path),
        "--set",
        "synthetic.enabled=true",
    ]
    assert main([*args, "--set", "engine.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert "engine.precision=fp16 is not supported" in err and "bf16 or fp32" in err
    assert not (tmp_path / "checkpoints").exists()
