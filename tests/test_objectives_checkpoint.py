"""The EMA teacher, predictor, text tower and temperature are part of the objective's state and resume exactly,
both through `state_dict` and through DeepSpeed's own checkpoints (ZeRO-1 and ZeRO-3, fp32)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_objectives_helpers import fake_batch, tiny_m3i

from pretrain.engine.dist import local_world_env

STEPS_BEFORE, STEPS_TOTAL = 2, 3


def _train_step(obj, opt, step: int) -> float:
    out = obj(fake_batch(seed=step))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    obj.on_step_end(step + 1, 10)
    return float(out["loss"].detach())


@pytest.mark.slow
def test_state_dict_holds_teacher_predictor_text_and_resumes_exactly():
    obj = tiny_m3i()
    keys = obj.state_dict().keys()
    for prefix in (
        "backbone.",
        "teacher.backbone.",
        "teacher.projector.",
        "projector.",
        "predictor.",
        "text.",
        "sem_pool.",
    ):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert "logit_scale" in keys
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3)
    for step in range(STEPS_BEFORE):
        _train_step(obj, opt, step)
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())  # the live state mutates in the next step
    rng = torch.get_rng_state()
    want = _train_step(obj, opt, STEPS_BEFORE)
    want_teacher = {k: v.clone() for k, v in obj.teacher.state_dict().items()}

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = tiny_m3i()
    for p in resumed.parameters():
        p.data.normal_()
    resumed.load_state_dict(state)
    opt2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-3)
    opt2.load_state_dict(opt_state)
    torch.set_rng_state(rng)
    got = _train_step(resumed, opt2, STEPS_BEFORE)
    assert got == want
    for k, v in resumed.teacher.state_dict().items():
        assert torch.equal(v, want_teacher[k]), k


# ------------------------------------------------------------------------------------------- DeepSpeed
def _ds_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(local_world_env(0, 1, port), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")

    def engine_for(obj, stage):
        config = {
            "train_micro_batch_size_per_gpu": 6,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.05, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "gradient_clipping": 5.0,
            "steps_per_print": 10**9,
        }
        frozen = {id(p) for p in obj.teacher.parameters()}
        params = [p for p in obj.parameters() if id(p) not in frozen]
        engine, *_ = deepspeed.initialize(model=obj, model_parameters=params, config=config)
        return engine

    def step(engine, i):
        out = engine(fake_batch(seed=i))
        engine.backward(out["loss"])
        engine.step()
        engine.module.on_step_end(i + 1, 10)
        return float(out["loss"].detach())

    def teacher_state(engine):
        params = list(engine.module.teacher.parameters())
        with deepspeed.zero.GatheredParameters(params):
            return {k: v.detach().clone() for k, v in engine.module.teacher.state_dict().items()}

    results = {}
    for stage in (1, 3):
        torch.manual_seed(0)
        engine = engine_for(tiny_m3i(), stage)
        for i in range(STEPS_BEFORE):
            step(engine, i)
        ckpt = os.path.join(out_dir, f"zero{stage}")
        engine.save_checkpoint(ckpt)
        saved_teacher = teacher_state(engine)
        rng = torch.get_rng_state()
        want = step(engine, STEPS_BEFORE)
        want_teacher = teacher_state(engine)

        torch.manual_seed(1)  # another init: the teacher must come back from the checkpoint
        resumed = engine_for(tiny_m3i(), stage)
        resumed.load_checkpoint(ckpt)
        loaded_teacher = teacher_state(resumed)
        torch.set_rng_state(rng)
        got = step(resumed, STEPS_BEFORE)
        results[stage] = {
            "loaded_equal": all(torch.equal(loaded_teacher[k], v) for k, v in saved_teacher.items()),
            "teacher_moved": any(not torch.equal(want_teacher[k], v) for k, v in saved_teacher.items()),
            "loss": (want, got),
            "after_equal": all(torch.equal(teacher_state(resumed)[k], v) for k, v in want_teacher.items()),
        }
    torch.save(results, os.path.join(out_dir, "results.pt"))


@pytest.mark.slow
def test_deepspeed_checkpoint_holds_ema_teacher_and_resumes_exactly(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ds_worker, args=(port, str(tmp_path)), nprocs=1, start_method="spawn")
    results = torch.load(tmp_path / "results.pt")
    for stage, r in results.items():
        assert r["loaded_equal"], f"ZeRO-{stage}: the teacher did not come back from the checkpoint"
        assert r["teacher_moved"], f"ZeRO-{stage}: the EMA step did not move the teacher"
        want, got = r["loss"]
        assert got == pytest.approx(want, rel=1e-6, abs=1e-7), f"ZeRO-{stage}: resumed loss differs"
        assert r["after_equal"], f"ZeRO-{stage}: the teacher after the resumed step differs"
