"""Gather-with-grad contrastive loss on 2 ranks (gloo) equals the single-process loss and gradients."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pretrain.objectives.m3i import contrastive_loss

WORLD, B, D = 2, 5, 8


def _data():
    g = torch.Generator().manual_seed(1)
    x_img = torch.randn(WORLD * B, 12, generator=g)
    x_txt = torch.randn(WORLD * B, 10, generator=g)
    keys = torch.tensor([0, 1, 2, 1, 100, 101, 0, 102, 2, 103])  # duplicate classes, also across ranks
    ok = torch.ones(WORLD * B, dtype=torch.bool)
    ok[3] = ok[8] = False  # rows without a text / invalid rows, one per rank
    return x_img, x_txt, keys, ok


def _models():
    torch.manual_seed(0)
    return torch.nn.Linear(12, D), torch.nn.Linear(10, D), torch.nn.Parameter(torch.tensor(2.3))


def _loss(img_net, txt_net, scale, x_img, x_txt, keys, ok, gather):
    img = F.normalize(img_net(x_img), dim=-1)
    txt = F.normalize(txt_net(x_txt), dim=-1)
    return contrastive_loss(img, txt, keys, ok, scale.exp(), gather=gather)


def _grads(*mods):
    out = []
    for m in mods:
        params = [m] if isinstance(m, torch.nn.Parameter) else list(m.parameters())
        out += [p.grad.detach().clone() for p in params]
    return out


def _worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x_img, x_txt, keys, ok = _data()
        rows = slice(rank * B, (rank + 1) * B)
        img_net, txt_net, scale = _models()
        loss = _loss(img_net, txt_net, scale, x_img[rows], x_txt[rows], keys[rows], ok[rows], gather=True)
        loss.backward()
        grads = _grads(img_net, txt_net, scale)
        # the engine averages gradients over ranks (data parallel); the logged loss is the rank mean
        for g in grads:
            dist.all_reduce(g)
            g /= WORLD
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= WORLD
        if rank == 0:
            torch.save({"loss": mean_loss, "grads": grads}, os.path.join(result_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_gather_with_grad_matches_single_process(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = torch.load(tmp_path / "dist.pt")

    x_img, x_txt, keys, ok = _data()
    img_net, txt_net, scale = _models()
    loss = _loss(img_net, txt_net, scale, x_img, x_txt, keys, ok, gather=False)
    loss.backward()
    want = _grads(img_net, txt_net, scale)

    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert len(got["grads"]) == len(want)
    for g, w in zip(got["grads"], want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    # and the rank-local loss without the gather would differ (the test has teeth)
    local = _loss(*_models(), x_img[:B], x_txt[:B], keys[:B], ok[:B], gather=False)
    assert not torch.allclose(local, loss)


def test_single_process_loss_is_clip_with_unique_keys():
    """With unique keys and every row valid, the loss is CLIP's symmetric cross-entropy."""
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    scale = torch.tensor(10.0)
    got = contrastive_loss(img, txt, torch.arange(6), torch.ones(6, dtype=torch.bool), scale, gather=False)
    logits = scale * img @ txt.T
    want = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    torch.testing.assert_close(got, want)
