"""The model's convolutions get 16-byte aligned weights, which cuDNN's engines need. The weights are aligned even
under DeepSpeed ZeRO-3 in bf16, where parameters are views into a flat buffer at 8-byte offsets. On an H200, the
ZeRO-3 recipe's depthwise conv found no cuDNN engine ("GET was unable to find an engine"). The CPU cannot run
cuDNN, so these tests check what reaches the convolution."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from pretrain.models.layers import AlignedConv2d


def _record_conv_weights(monkeypatch) -> list[int]:
    """data_ptr of every weight that reaches F.conv2d from now on."""
    seen: list[int] = []
    real = torch.nn.functional.conv2d

    def conv2d(x, weight, *args, **kwargs):
        seen.append(weight.data_ptr())
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.conv.F, "conv2d", conv2d)
    return seen


def test_aligned_conv_copies_a_misaligned_weight_view_and_keeps_its_gradient(monkeypatch):
    torch.manual_seed(0)
    plain = nn.Conv2d(8, 8, 3, padding=1, groups=8).bfloat16()
    conv = AlignedConv2d(8, 8, 3, padding=1, groups=8).bfloat16()
    flat = torch.zeros(
        4 + plain.weight.numel(), dtype=torch.bfloat16
    )  # 4 bf16 = 8 bytes off the buffer's start
    flat[4:] = plain.weight.detach().flatten()
    conv.weight = nn.Parameter(flat[4:].view_as(plain.weight))
    conv.bias = nn.Parameter(plain.bias.detach().clone())
    assert conv.weight.data_ptr() % 16 == 8
    assert list(conv.state_dict()) == list(plain.state_dict())  # checkpoints load either way

    unaligned = nn.Conv2d(8, 8, 3, padding=1, groups=8).bfloat16()
    unaligned.weight = conv.weight  # the same view in a plain nn.Conv2d

    seen = _record_conv_weights(monkeypatch)
    x = torch.randn(2, 8, 5, 5).bfloat16()
    out, ref = conv(x), plain(x)
    unaligned(x)
    # AlignedConv2d copied its view; a plain nn.Conv2d passes the view as is
    assert [ptr % 16 for ptr in seen] == [0, 0, 8]
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(conv.weight.grad, plain.weight.grad) and torch.equal(conv.bias.grad, plain.bias.grad)


def test_an_aligned_weight_is_not_copied(monkeypatch):
    conv = AlignedConv2d(4, 4, 1)
    assert conv.weight.data_ptr() % 16 == 0
    passed = _record_conv_weights(monkeypatch)
    conv(torch.randn(1, 4, 3, 3))
    assert passed == [conv.weight.data_ptr()]


_ZERO3 = """
import json, torch, deepspeed
from pretrain.engine.dist import ensure_process_group
from pretrain.models.registry import create_model

ensure_process_group()
torch.manual_seed(0)
model = create_model("internimage_t", num_classes=10, depths=[1, 1, 1, 1])
for buf in model.buffers():
    if buf.is_floating_point():
        buf.data = buf.data.bfloat16()
seen_params, passed = [], []
def hook(mod, args):
    seen_params.extend(p.data_ptr() % 16 for p in mod.parameters(recurse=False))
for m in model.modules():
    m.register_forward_pre_hook(hook)
real = torch.nn.functional.conv2d
def conv2d(x, w, *a, **k):
    passed.append(w.data_ptr() % 16)
    return real(x, w, *a, **k)
torch.nn.modules.conv.F.conv2d = conv2d
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "bf16": {"enabled": True}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
x = torch.randn(2, 3, 64, 64).bfloat16()
for _ in range(2):
    loss = engine(x).float().mean()
    engine.backward(loss)
    engine.step()
print(json.dumps({"params": seen_params, "conv": passed}))
"""


@pytest.mark.slow
def test_convolutions_get_aligned_weights_under_zero3_bf16():
    """InternImage-T under ZeRO-3 in bf16 (a world of one, CPU), for two steps. Many parameters that the modules
    hold are 8-byte aligned, and every weight that reaches a convolution is 16-byte aligned."""
    import json

    res = subprocess.run([sys.executable, "-c", _ZERO3], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert any(m != 0 for m in seen["params"]), (
        "ZeRO-3 no longer misaligns parameters: revisit pretrain.ops.alignment"
    )
    assert len(seen["conv"]) >= 2 * 9 and all(m == 0 for m in seen["conv"]), seen["conv"]
