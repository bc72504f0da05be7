"""M3I one-stage pretraining (arXiv 2211.09807): semantic + dense targets from one pass over a mixed input.

One objective, three families (Fig. 1 of the paper), each a weight of this module:

- semantic (supervised / weakly supervised): every image of the input gets a global embedding that is
  contrasted CLIP-style with the text tower's embedding of its caption or of a prompt of its class name
  (learnable temperature, embeddings gathered across ranks with gradients, local rows per rank);
- dense intra-view: the predictor reconstructs the EMA teacher's token features of A's same view where B
  hides A;
- dense inter-view: the predictor reconstructs the teacher's features of B's *other* augmented view, placed
  by its geometry relative to the view of B that is in the input.

Input (Fig. 2): x = M⊙v_A + (1−M)⊙v_B, M a blockwise mask on the 16-px grid, B = the batch rolled by one
(image i is mixed with image i−1). With mixing off, A = B = the image: the inter term is then SiameseIM's
(predict the other view of the same image) and the semantic term is plain CLIP.
"""

from __future__ import annotations

import copy
import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..fields import ConfigError
from ..parallel import TeacherEMA, local_shard
from ..text import TextTokenizer, TextTransformer
from .base import Objective
from .config import ObjectiveConfig
from .distributed import all_reduce_sum, gather_no_grad, gather_with_grad, world
from .geometry import block_mask, grid_geometry, relative_geometry
from .metrics import TopK, labelled_rows
from .predictor import Predictor

PATCH = 16  # stride of the token map the mask and the dense targets live on


class M3IObjective(Objective):
    """See the module docstring. `cfg.name == "contrastive"` forces mixing and the dense terms off."""

    def __init__(self, cfg: ObjectiveConfig, model: nn.Module, data_info: dict):
        super().__init__()
        self.cfg = cfg
        self.backbone = model
        contrastive = cfg.name == "contrastive"
        self.sem_weight = cfg.semantic.weight
        self.intra_weight = 0.0 if contrastive else cfg.dense.intra_weight
        self.inter_weight = 0.0 if contrastive else cfg.dense.inter_weight
        self.mixing = (not contrastive) and cfg.mix.enabled and cfg.mix.ratio > 0
        if self.sem_weight <= 0 and self.intra_weight <= 0 and self.inter_weight <= 0:
            raise ValueError("every loss weight of the objective is zero")
        self.label_names: list[str] = list(data_info.get("label_names") or [])
        self.num_classes = int(data_info.get("num_classes") or len(self.label_names))
        tokens_dim = int(model.tokens16_dim)
        self._clip_head = bool(getattr(model, "use_clip_projector", False))

        # ---- semantic: text tower + image embedding head + temperature
        self.tokenizer: TextTokenizer | None = None
        if self.sem_weight > 0:
            self.tokenizer = resolve_tokenizer(cfg, data_info, extra_texts=self.prompts_for_training())
            t = cfg.text
            self.text = TextTransformer(
                self.tokenizer.vocab_size,
                cfg.semantic.embed_dim,
                t.context_length,
                t.width,
                t.depth,
                t.heads,
                t.mlp_ratio,
            )
            if self._clip_head:  # H/G: the official clip_projector + fc_norm is the image embedding
                image_dim = int(model.pooled_dim)
            else:  # T–XL: our masked attention pooling over the stride-16 tokens
                from ..models.heads import AttentionPoolingBlock

                self.sem_pool = AttentionPoolingBlock(tokens_dim, cfg.semantic.pool_heads, qkv_bias=True)
                self.sem_norm = nn.LayerNorm(tokens_dim, eps=1e-6)
                image_dim = tokens_dim
            self.image_proj = (
                nn.Identity()
                if image_dim == cfg.semantic.embed_dim
                else nn.Linear(image_dim, cfg.semantic.embed_dim, bias=False)
            )
            if isinstance(self.image_proj, nn.Linear):
                nn.init.trunc_normal_(self.image_proj.weight, std=image_dim**-0.5)
            # shape (1,), not a 0-d tensor: DeepSpeed's initial parameter broadcast views every parameter as
            # bytes, which fails for 0-d tensors
            self.logit_scale = nn.Parameter(
                torch.full((1,), math.log(1.0 / cfg.semantic.temperature_init)),
                requires_grad=cfg.semantic.learnable_temperature,
            )

        # ---- dense: projector + predictor (online) and the EMA teacher (backbone + projector)
        if self.intra_weight > 0 or self.inter_weight > 0:
            d = cfg.dense
            self.projector = nn.Sequential(
                nn.Linear(tokens_dim, d.decoder_width), nn.GELU(), nn.Linear(d.decoder_width, d.projector_dim)
            )
            self.predictor = Predictor(d.projector_dim, d.decoder_width, d.decoder_depth, d.decoder_heads)
            self.teacher = nn.ModuleDict(
                {"backbone": copy.deepcopy(model), "projector": copy.deepcopy(self.projector)}
            )
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.teacher_ema = TeacherEMA()  # fp32 master when DeepSpeed stores the teacher in bf16/fp16
        self.ema_momentum = cfg.dense.ema_momentum

    # ------------------------------------------------------------------------------------------ contract
    def frozen_module_names(self) -> tuple[str, ...]:
        return ("teacher",) if hasattr(self, "teacher") else ()

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "teacher"):
            self.teacher.eval()  # the teacher never uses dropout / drop-path / batch statistics
        return self

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Cosine momentum schedule, EMA update of the teacher, temperature clamp."""
        if hasattr(self, "teacher"):
            self.ema_momentum = ema_momentum(
                step, total_steps, self.cfg.dense.ema_momentum, self.cfg.dense.ema_momentum_end
            )
            self.teacher_ema.update(self._teacher_params(), self._student_params(), self.ema_momentum)
            for t, s in zip(self.teacher.buffers(), self._student_buffers(), strict=True):
                t.copy_(s)
        if hasattr(self, "logit_scale"):
            local_shard(self.logit_scale).clamp_(0.0, math.log(1.0 / self.cfg.semantic.temperature_min))

    def _teacher_params(self) -> list[torch.Tensor]:
        return [*self.teacher["backbone"].parameters(), *self.teacher["projector"].parameters()]

    def _student_params(self) -> list[torch.Tensor]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def _student_buffers(self) -> list[torch.Tensor]:
        return [*self.backbone.buffers(), *self.projector.buffers()]

    def rank_state(self) -> dict:
        """Per-rank state beyond the module's parameters (saved with the trainer state): the teacher's fp32
        master when the teacher is stored in low precision."""
        return {"teacher_ema": self.teacher_ema.state_dict()} if hasattr(self, "teacher") else {}

    def load_rank_state(self, state: dict) -> str | None:
        if hasattr(self, "teacher") and "teacher_ema" in state:
            return self.teacher_ema.load_state_dict(state["teacher_ema"], self._teacher_params())
        return None

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        image = batch["image"]
        n = image.shape[0]
        device = image.device
        valid = batch.get("valid")
        valid = (
            torch.ones(n, dtype=torch.bool, device=device) if valid is None else valid.to(device, torch.bool)
        )
        h, w = image.shape[-2] // PATCH, image.shape[-1] // PATCH

        if self.mixing:
            a_mask = block_mask(
                n, h, w, self.cfg.mix.ratio, self.cfg.mix.min_block, self.cfg.mix.aspect_min
            ).to(device)
            pixel_mask = F.interpolate(a_mask[:, None].to(image.dtype), size=image.shape[-2:], mode="nearest")
            x = image * pixel_mask + torch.roll(image, 1, 0) * (1.0 - pixel_mask)
            partner = torch.roll(torch.arange(n, device=device), 1)  # B of row i is image i−1
        else:
            a_mask, x, partner = None, image, torch.arange(n, device=device)

        tokens = self.backbone.forward_features(x)["tokens16"]  # (n, h, w, D)
        if tokens.shape[1:3] != (h, w):
            raise ValueError(
                f"expected a {h}x{w} stride-16 map for {tuple(image.shape[-2:])} inputs, got {tuple(tokens.shape[1:3])}"
            )
        out: dict[str, torch.Tensor] = {}
        loss = tokens.new_zeros((), dtype=torch.float32)

        if self.sem_weight > 0:
            sem = self.semantic_loss(batch, tokens, a_mask, valid)
            loss = loss + self.sem_weight * sem
            out["semantic"] = sem.detach()
            out["temperature"] = (-self.logit_scale.detach()).exp().squeeze(0)
        if self.intra_weight > 0 or self.inter_weight > 0:
            intra, inter = self.dense_loss(batch, tokens, a_mask, partner, valid)
            if self.intra_weight > 0:
                loss = loss + self.intra_weight * intra
                out["intra"] = intra.detach()
            if self.inter_weight > 0:
                loss = loss + self.inter_weight * inter
                out["inter"] = inter.detach()
            out["ema_momentum"] = torch.tensor(self.ema_momentum)
            out.update(self._stats)
        out["loss"] = loss
        return out

    # ------------------------------------------------------------------------------------------ semantic
    def image_embedding(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens16 (n, h, w, D), token_mask (n, h, w) bool or None -> (n, embed_dim) (not normalised)."""
        if self._clip_head:
            pooled = self.backbone.pool_tokens(tokens, token_mask)
        else:
            n, h, w, d = tokens.shape
            flat = token_mask.reshape(n, h * w) if token_mask is not None else None
            pooled = self.sem_norm(self.sem_pool(tokens.reshape(n, h * w, d), flat))
        return self.image_proj(pooled)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """list of n strings -> (n, embed_dim) (not normalised)."""
        device = self.logit_scale.device
        ids = self.tokenizer(texts).to(device)
        return self.text(ids, self.tokenizer.end_index(ids))

    def choose_texts(self, batch: dict, valid: torch.Tensor) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Per row: the text to contrast with, its positive-set key, and whether the row has a text.

        Rows with the same key are positives of each other (UniCL): a class prompt's key is its class, a
        caption's key a hash of the caption, so two samples of one class (or one caption) are never negatives.
        """
        n = valid.shape[0]
        captions = list(batch.get("caption") or [""] * n)
        has_caption = batch.get("has_caption")
        has_caption = (
            torch.tensor([bool(c) for c in captions])
            if has_caption is None
            else has_caption.to("cpu", torch.bool)
        )
        labelled = (
            labelled_rows(batch, len(self.label_names)).cpu()
            if self.label_names
            else torch.zeros(n, dtype=torch.bool)
        )
        templates = self.cfg.semantic.prompt_templates
        texts, keys, has_text = [], torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        for i in range(n):
            use_label = bool(labelled[i]) and (
                not has_caption[i] or float(torch.rand(())) < self.cfg.semantic.label_prompt_prob
            )
            if use_label:
                label = int(batch["label"][i])
                texts.append(
                    templates[int(torch.randint(len(templates), ()))].format(self.label_names[label])
                )
                keys[i] = label
                has_text[i] = True
            elif has_caption[i]:
                texts.append(captions[i])
                keys[i] = len(self.label_names) + zlib.crc32(captions[i].encode("utf-8"))
                has_text[i] = True
            else:
                texts.append("")
        return texts, keys.to(valid.device), has_text.to(valid.device) & valid

    def semantic_loss(
        self, batch: dict, tokens: torch.Tensor, a_mask: torch.Tensor | None, valid: torch.Tensor
    ) -> torch.Tensor:
        texts, keys, has_text = self.choose_texts(batch, valid)
        txt = F.normalize(self.encode_text(texts).float(), dim=-1)
        scale = self.logit_scale.exp().squeeze(0)
        if a_mask is None:
            img = F.normalize(self.image_embedding(tokens).float(), dim=-1)
            return contrastive_loss(img, txt, keys, has_text, scale, self.cfg.semantic.gather_with_grad)
        emb_a = self.image_embedding(tokens, a_mask)  # image i, from mix i
        emb_b = self.image_embedding(tokens, ~a_mask)  # image i−1, from mix i
        emb_b = torch.roll(emb_b, -1, 0)  # row k: image k, from mix k+1
        loss_a = contrastive_loss(
            F.normalize(emb_a.float(), dim=-1), txt, keys, has_text, scale, self.cfg.semantic.gather_with_grad
        )
        loss_b = contrastive_loss(
            F.normalize(emb_b.float(), dim=-1), txt, keys, has_text, scale, self.cfg.semantic.gather_with_grad
        )
        return 0.5 * (loss_a + loss_b)

    # ------------------------------------------------------------------------------------------ dense
    @torch.no_grad()
    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher targets: LayerNorm (no affine) of the EMA projector on the EMA tokens16: (n, h, w, P)."""
        tokens = self.teacher["backbone"].forward_features(images)["tokens16"]
        z = self.teacher["projector"](tokens).float()
        if self.cfg.dense.center_targets:
            rows = z.reshape(-1, z.shape[-1])
            count = all_reduce_sum(torch.tensor(float(rows.shape[0]), device=z.device))
            z = z - all_reduce_sum(rows.sum(0)) / count
        target = F.layer_norm(z, z.shape[-1:])
        # collapse monitor: mean squared cosine between target tokens, 1 when every token has the same
        # (or the opposite) direction, about 1/P when the targets use all P dimensions
        flat = F.normalize(target.reshape(-1, z.shape[-1]), dim=-1)
        self._stats["target_spread"] = (flat.T @ flat / flat.shape[0]).square().sum()
        return target

    def dense_loss(
        self,
        batch: dict,
        tokens: torch.Tensor,
        a_mask: torch.Tensor | None,
        partner: torch.Tensor,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image = batch["image"]
        n, h, w, _ = tokens.shape
        context = self.projector(tokens)
        ctx_geo = grid_geometry(n, h, w, device=tokens.device)
        from_b = (
            ~a_mask if a_mask is not None else torch.zeros(n, h, w, dtype=torch.bool, device=tokens.device)
        )
        zero = tokens.new_zeros((), dtype=torch.float32)
        intra = inter = zero
        self._stats = {}
        if self.intra_weight > 0:
            target = self.targets(image)
            pred = self.predictor(context, ctx_geo, from_b, ctx_geo, Predictor.INTRA)
            where = (
                from_b
                if self.cfg.dense.intra_on_masked_only and a_mask is not None
                else torch.ones_like(from_b)
            )
            where = where & valid[:, None, None]
            intra = self.token_loss(pred, target, where)
        if self.inter_weight > 0:
            other = batch.get("image2")
            boxes = batch.get("view_boxes")
            if other is None:  # one view per image: B's same view (its geometry is the grid)
                target = self.targets(image)[partner]
                query_geo = ctx_geo
            else:
                target = self.targets(other)[partner]
                th, tw = target.shape[1:3]
                if boxes is None or boxes.shape[1] < 2:
                    raise ValueError("batch has image2 but no view_boxes for two views")
                boxes = boxes.to(tokens.device, torch.float32)[partner]
                query_geo = relative_geometry(boxes[:, 0], boxes[:, 1], h, w, th, tw)
            pred = self.predictor(context, ctx_geo, from_b, query_geo, Predictor.INTER)
            where = valid[partner][:, None, None].expand(-1, *pred.shape[1:3])
            inter = self.token_loss(pred, target, where)
        return intra, inter

    def token_loss(self, pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """Mean over the selected tokens of normalised L2 (2 − 2 cos) or smooth-L1, plus the UniGrad
        correlation term; pred/target (n, h, w, P), where (n, h, w) bool."""
        pred, weight = pred.float(), where.to(torch.float32)
        if self.cfg.dense.loss == "cosine":
            per_token = 2.0 - 2.0 * F.cosine_similarity(pred, target, dim=-1)
        else:
            per_token = F.smooth_l1_loss(pred, target, reduction="none").mean(-1)
        count = weight.sum().clamp_min(1.0)
        loss = (per_token * weight).sum() / count
        sel = where.reshape(-1)
        t_hat = F.normalize(target.reshape(-1, target.shape[-1])[sel], dim=-1)
        if t_hat.shape[0] > 0 and self.cfg.dense.corr_weight > 0:
            corr = t_hat.T @ t_hat / t_hat.shape[0]  # F = E[t̂ t̂ᵀ] (P, P), no gradient (targets)
            p_hat = F.normalize(pred.reshape(-1, pred.shape[-1])[sel], dim=-1)
            loss = loss + self.cfg.dense.corr_weight * ((p_hat @ corr) * p_hat).sum(-1).mean()
        return loss

    # ------------------------------------------------------------------------------------------ zero-shot
    def prompts_for_training(self) -> list[str]:
        return [t.format(name) for name in self.label_names for t in self.cfg.semantic.prompt_templates]

    @torch.no_grad()
    def class_embeddings(self, label_names: Sequence[str], chunk: int = 256) -> torch.Tensor:
        """(C, embed_dim) normalised class embeddings: the mean of the normalised template embeddings."""
        templates = self.cfg.semantic.prompt_templates
        rows = []
        for start in range(0, len(label_names), chunk):
            names = label_names[start : start + chunk]
            emb = self.encode_text([t.format(c) for c in names for t in templates]).float()
            emb = F.normalize(emb, dim=-1).view(len(names), len(templates), -1).mean(1)
            rows.append(F.normalize(emb, dim=-1))
        return torch.cat(rows)

    @torch.no_grad()
    def evaluate(
        self, batches: Iterable[dict], label_names: Sequence[str] | None = None, max_batches: int = 0
    ) -> dict[str, float]:
        """Zero-shot classification of labelled rows by class-name prompts (whole, unmixed images).

        Returns {"zeroshot/top1", "zeroshot/top5", "zeroshot/n"} (counts reduced over ranks; every rank must
        call it). `label_names` defaults to the training label names.
        """
        if self.sem_weight <= 0:
            return {}
        names = list(label_names or self.label_names)
        if not names:
            raise ValueError("zero-shot evaluation needs label names")
        was_training = self.training
        self.eval()
        meter = TopK(self.cfg.zero_shot.topk)
        try:
            classes = self.class_embeddings(names)
            for i, batch in enumerate(batches):
                if max_batches and i >= max_batches:
                    break
                rows = labelled_rows(batch, len(names))
                if not rows.any():
                    continue
                tokens = self.backbone.forward_features(batch["image"][rows])["tokens16"]
                img = F.normalize(self.image_embedding(tokens).float(), dim=-1)
                meter.update(img @ classes.T, batch["label"][rows].to(img.device))
        finally:
            self.train(was_training)
        return meter.result("zeroshot")


# ---------------------------------------------------------------------------------------------- losses
def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    keys: torch.Tensor,
    has_text: torch.Tensor,
    scale: torch.Tensor,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric CLIP loss of this rank's rows against the global batch, with UniCL multi-positive targets.

    img, txt (b, d) normalised; keys (b,) long (equal keys are positives); has_text (b,) bool (rows without
    a text take no part, neither as queries nor as negatives). The sum over local rows is divided by the
    global number of rows / world size, so the mean of the ranks' losses equals the single-process loss on
    the concatenated batch, and so do the (rank-averaged) gradients.
    """
    if gather:
        img_all, txt_all = gather_with_grad(img), gather_with_grad(txt)
        keys_all, ok_all = gather_no_grad(keys), gather_no_grad(has_text)
    else:
        img_all, txt_all, keys_all, ok_all = img, txt, keys, has_text
    positives = (keys[:, None] == keys_all[None, :]) & ok_all[None, :]
    target = positives.float() / positives.sum(-1, keepdim=True).clamp_min(1).float()
    neg_inf = torch.finfo(torch.float32).min

    def side(query: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        logits = (scale * query @ bank.T).masked_fill(~ok_all[None, :], neg_inf)
        return -(target * logits.log_softmax(-1)).sum(-1)

    per_row = 0.5 * (side(img, txt_all) + side(txt, img_all))
    per_row = per_row * has_text.float()
    count = has_text.float().sum()
    if gather:
        _, size = world()
        count = all_reduce_sum(count) / size
    return per_row.sum() / count.clamp_min(1.0)


# ---------------------------------------------------------------------------------------------- EMA
def ema_momentum(step: int, total_steps: int, start: float, end: float = 1.0) -> float:
    """Cosine schedule from `start` (step 0) to `end` (step total_steps) (BYOL)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1.0) / 2.0


# ---------------------------------------------------------------------------------------------- tokenizer
def resolve_tokenizer(
    cfg: ObjectiveConfig, data_info: dict, extra_texts: Sequence[str] = ()
) -> TextTokenizer:
    """Load `cfg.text.tokenizer`, or train one on the data's captions (+ class prompts) when it is missing.

    Training happens only in a single-process run: inside a multi-rank job every rank would train at model
    build (and ranks could race on the file), so such a job refuses with the command that trains it once."""
    path = cfg.text.tokenizer
    if path and os.path.exists(path):
        return TextTokenizer.from_file(path, cfg.text.context_length)
    command = f"pretrain data tokenizer --manifest <corpus> --vocab-size {cfg.text.vocab_size} --out {path or 'tokenizer.json'}"
    captions = data_info.get("captions_iter")
    if not cfg.text.train_if_missing or captions is None:
        raise ConfigError(f"objective.text.tokenizer {path!r} not found: train one with `{command}`")
    world_size = int(data_info.get("world_size", world()[1]))
    if world_size > 1:
        raise ConfigError(
            f"objective.text.tokenizer {path!r} not found, and objective.text.train_if_missing trains one only in "
            f"a single-process run (this job has {world_size} ranks): train it once with `{command}`, then rerun"
        )
    texts: Callable | Iterable = captions() if callable(captions) else captions
    corpus = list(texts) + list(extra_texts)
    tok = TextTokenizer.train(corpus, cfg.text.vocab_size, cfg.text.context_length)
    rank = data_info.get("rank", world()[0])
    if path and rank == 0:
        tok.save(path)
    return tok
