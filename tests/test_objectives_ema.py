"""EMA teacher: momentum schedule, update math, exclusion from training, eval mode."""

from __future__ import annotations

import math

import pytest
import torch
from test_objectives_helpers import NAMES, tiny_m3i
from torch import nn

from pretrain.objectives.m3i import ema_momentum, ema_update


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
    ema_update(teacher, student, 0.9)
    for t, old, s in zip(teacher.parameters(), t0, student.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)


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
