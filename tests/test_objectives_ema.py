"""EMA teacher: momentum schedule, update math (also with a bf16 teacher), exclusion from training, eval mode,
per-rank state."""

from __future__ import annotations

import math

import pytest
import torch
from test_objectives_helpers import NAMES, tiny_m3i
from torch import nn

from pretrain.objectives.m3i import ema_momentum
from pretrain.parallel import TeacherEMA


def test_cosine_momentum_schedule():
    assert ema_momentum(0, 100, 0.995) == pytest.approx(0.995)
    assert ema_momentum(100, 100, 0.995) == pytest.approx(1.0)
    assert ema_momentum(50, 100, 0.995) == pytest.approx(0.9975)
    assert ema_momentum(25, 100, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert ema_momentum(500, 100, 0.995) == pytest.approx(1.0)  # clamped past the end


def test_ema_update_math():
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in teacher.parameters()]
    ema = TeacherEMA()
    ema.update(list(teacher.parameters()), list(student.parameters()), 0.9)
    assert ema.master is None  # fp32 teachers are updated in place
    for t, old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)


def _bf16_pair(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(4096, generator=g)
    student = teacher + 0.05 * torch.randn(4096, generator=g)
    return teacher, student


def test_bf16_teacher_follows_the_fp32_ema():
    """A bf16 teacher at m=0.996 must track the fp32 EMA; plain bf16 arithmetic does not move at all."""
    t32, s32 = _bf16_pair()
    teacher, student = t32.bfloat16(), s32.bfloat16()
    ref = teacher.double()
    naive = teacher.clone()
    ema = TeacherEMA()
    for _ in range(200):
        ema.update([teacher], [student], 0.996)
        naive.lerp_(student, 0.004)
        ref.lerp_(student.double(), 0.004)
    assert ema.master is not None and ema.master[0].dtype == torch.float32
    torch.testing.assert_close(ema.master[0].double(), ref, rtol=0, atol=1e-5)
    assert torch.equal(teacher, ema.master[0].bfloat16())  # the teacher is the master, rounded once
    moved = (ref - t32.bfloat16().double()).abs().mean()  # ~0.55 of the gap after 200 steps
    stuck = (naive.double() - ref).abs().mean()
    assert stuck > 0.5 * moved, (stuck, moved)  # the failure this guards against


def test_teacher_master_resumes_exactly_and_rejects_another_layout():
    t32, s32 = _bf16_pair(1)
    teacher, student = t32.bfloat16(), s32.bfloat16()
    ema = TeacherEMA()
    for _ in range(5):
        ema.update([teacher], [student], 0.99)
    state = {"master": [m.clone() for m in ema.master]}
    saved_teacher = teacher.clone()
    ema.update([teacher], [student], 0.99)

    resumed, teacher2 = TeacherEMA(), saved_teacher.clone()
    assert resumed.load_state_dict(state, [teacher2]) is None
    resumed.update([teacher2], [student], 0.99)
    assert torch.equal(teacher2, teacher) and torch.equal(resumed.master[0], ema.master[0])

    other = TeacherEMA()
    warning = other.load_state_dict(state, [torch.zeros(7, dtype=torch.bfloat16)])
    assert "does not fit" in warning and other.master is None


def test_objective_rank_state_carries_the_master():
    obj = tiny_m3i()
    assert obj.rank_state() == {"teacher_ema": {"master": None}}  # fp32: nothing extra
    obj.teacher.bfloat16()  # what DeepSpeed's bf16 mode does to the whole module
    obj.on_step_end(1, 10)
    master = obj.rank_state()["teacher_ema"]["master"]
    assert master is not None and len(master) == len(obj._teacher_params())
    fresh = tiny_m3i()
    fresh.teacher.bfloat16()
    assert fresh.load_rank_state(obj.rank_state()) is None
    assert all(torch.equal(a, b) for a, b in zip(fresh.teacher_ema.master, master))


def test_objective_teacher_follows_schedule():
    obj = tiny_m3i()
    assert obj.frozen_module_names() == ("teacher",)
    assert not any(p.requires_grad for p in obj.teacher.parameters())
    obj.train()
    assert not obj.teacher.training and obj.backbone.training
    # teacher starts as a copy; perturb the student and step
    with torch.no_grad():
        for p in obj.backbone.parameters():
            p.add_(0.1)
    before = [p.detach().clone() for p in obj.teacher["backbone"].parameters()]
    obj.on_step_end(30, 100)
    m = ema_momentum(30, 100, obj.cfg.dense.ema_momentum)
    assert obj.ema_momentum == pytest.approx(m)
    for t, old, s in zip(obj.teacher["backbone"].parameters(), before, obj.backbone.parameters()):
        torch.testing.assert_close(t, m * old + (1 - m) * s)
    assert len(NAMES) == 6
