"""The objective family: which terms each configuration computes, the H/G embedding path, supervised rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_objectives_helpers import NAMES, fake_batch, tiny_backbone, tiny_cfg, tiny_m3i

from pretrain.objectives import ObjectiveConfig, build_objective


def _terms(out):
    return {k for k in out if k != "loss"}


def test_m3i_computes_every_term_and_backprops():
    obj = tiny_m3i()
    out = obj(fake_batch())
    assert {"semantic", "intra", "inter", "temperature", "ema_momentum", "target_spread"} <= _terms(out)
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert obj.backbone.patch_embed.conv1.weight.grad is not None
    assert obj.text.token_embedding.weight.grad is not None
    assert obj.predictor.mask_token.grad is not None
    assert all(p.grad is None for p in obj.teacher.parameters())


def test_contrastive_and_self_supervised_are_the_same_objective_with_weights_zeroed():
    contrastive = tiny_m3i("contrastive")
    assert not hasattr(contrastive, "teacher") and contrastive.frozen_module_names() == ()
    assert _terms(contrastive(fake_batch())) == {"semantic", "temperature"}
    ssl = tiny_m3i(semantic=dict(weight=0.0))
    assert not hasattr(ssl, "text")
    assert {"intra", "inter"} <= _terms(ssl(fake_batch()))
    with pytest.raises(ValueError, match="zero"):
        tiny_m3i(semantic=dict(weight=0.0), dense=dict(intra_weight=0.0, inter_weight=0.0))


def test_one_view_batches_and_no_mixing():
    obj = tiny_m3i(mix=dict(enabled=False))
    out = obj(fake_batch(views=1))  # inter-view falls back to the same view; intra covers every token
    assert torch.isfinite(out["loss"]) and {"intra", "inter"} <= _terms(out)


def test_h_g_path_uses_the_clip_projector_per_image():
    obj = tiny_m3i(clip=True, semantic=dict(embed_dim=768))
    assert not hasattr(obj, "sem_pool") and isinstance(obj.image_proj, torch.nn.Identity)
    tokens = torch.randn(2, 4, 4, obj.backbone.tokens16_dim)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    emb = obj.image_embedding(tokens, mask)
    assert emb.shape == (2, 768)
    # per-image pooling: the tokens outside the mask do not matter
    other = tokens.clone()
    other[:, 2:] = torch.randn_like(other[:, 2:])
    torch.testing.assert_close(obj.image_embedding(other, mask), emb)
    # without a mask it is the official pooled feature
    torch.testing.assert_close(obj.image_embedding(tokens), obj.backbone.pool_tokens(tokens))
    out = obj(fake_batch())
    assert torch.isfinite(out["loss"])


def test_zero_shot_uses_prompt_ensembles_and_topk():
    obj = tiny_m3i()
    classes = obj.class_embeddings(NAMES)
    assert classes.shape == (6, 64)
    torch.testing.assert_close(classes.norm(dim=-1), torch.ones(6))
    result = obj.evaluate([fake_batch(), fake_batch(seed=1)])
    assert set(result) == {"zeroshot/top1", "zeroshot/top5", "zeroshot/n"}
    assert result["zeroshot/n"] == 8  # 2 x (6 rows - 1 unlabelled - 1 invalid)
    assert obj.training


def test_supervised_cross_entropy_ignores_unlabelled_and_invalid_rows():
    torch.manual_seed(0)
    model = tiny_backbone()
    obj = build_objective(ObjectiveConfig(name="supervised"), model, {"num_classes": 6})
    batch = fake_batch()
    batch["label"][3] = 17  # out of range: ignored as well
    out = obj(batch)
    rows = torch.tensor([True, False, True, False, True, False])
    logits = obj.logits(batch["image"])
    want = F.cross_entropy(logits[rows], batch["label"][rows], label_smoothing=0.1)
    torch.testing.assert_close(out["loss"], want)
    assert 0.0 <= float(out["top1"]) <= 1.0
    # with an official head of the right size, that head is the classifier (keys stay `head.*`)
    with_head = build_objective(
        ObjectiveConfig(name="supervised"), tiny_backbone_with_head(6), {"num_classes": 6}
    )
    assert with_head.classifier is None
    with pytest.warns(UserWarning, match="head has 8 classes but the data has 6"):
        other = build_objective(
            ObjectiveConfig(name="supervised"), tiny_backbone_with_head(8), {"num_classes": 6}
        )
    assert other.classifier.out_features == 6


def tiny_backbone_with_head(num_classes: int):
    from pretrain.models import InternImage

    return InternImage(channels=16, depths=[1, 1, 2, 1], groups=[1, 2, 4, 8], num_classes=num_classes)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        ObjectiveConfig(name="clip")
    with pytest.raises(ValueError):
        tiny_cfg(mix=dict(ratio=1.0))


@pytest.mark.slow
def test_bf16_module_and_inputs():
    """DeepSpeed bf16 casts the whole objective (teacher included) and the engine sends bf16 images."""
    obj = tiny_m3i().to(torch.bfloat16)
    batch = fake_batch()
    batch["image"], batch["image2"] = batch["image"].bfloat16(), batch["image2"].bfloat16()
    out = obj(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    obj.on_step_end(1, 10)
    assert obj.evaluate([batch])["zeroshot/n"] == 4


def test_missing_tokenizer_is_never_trained_inside_a_multi_rank_job(tmp_path):
    from test_objectives_helpers import CAPTIONS, tiny_cfg

    from pretrain.config import ConfigError
    from pretrain.objectives.m3i import resolve_tokenizer

    path = tmp_path / "tok.json"
    cfg = tiny_cfg(text={"tokenizer": str(path)})
    with pytest.raises(ConfigError, match=r"objective\.text\.tokenizer .*2 ranks.*pretrain data tokenizer"):
        resolve_tokenizer(cfg, {"captions_iter": CAPTIONS, "rank": 0, "world_size": 2})
    assert not path.exists()
    # a single process still trains it (the tiny CPU quick start) and rank 0 writes it
    tok = resolve_tokenizer(cfg, {"captions_iter": CAPTIONS, "rank": 0, "world_size": 1})
    assert tok.vocab_size > 0 and path.exists()
