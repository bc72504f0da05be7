"""The `objective:` section of a run config.

One schema for every objective. `name` picks the family; the M3I objective (`"m3i"`) contains the other two
as special cases: `"contrastive"` is M3I with the dense weights at zero and mixing off, and a pure
self-supervised run is M3I with `semantic.weight: 0`. `"supervised"` is plain classification (a linear
classifier on the pooled feature, cross-entropy on `label`), the recipe of an IN-22K/IN-1K stage.

Values that the M3I paper (arXiv 2211.09807) does not publish are config values whose default is taken from
the same authors' SiameseIM (arXiv 2206.01204) or from CLIP, and each field says which. Nothing here is mutated
after load: `build_objective` derives the effective switches (e.g. whether an EMA teacher is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..fields import FieldError, Section
from ..fields import field as _f

OBJECTIVE_NAMES = ("supervised", "contrastive", "m3i")


@dataclass(frozen=True)
class TextConfig(Section):
    """The text tower (a CLIP-style causal transformer) and its BPE tokenizer."""

    tokenizer: str = _f(
        "",
        "Path to a `tokenizers` tokenizer.json (ours from `pretrain data tokenizer`, or any user file). Required when a semantic term is on; the vocabulary size of the tower is read from this file.",
    )
    train_if_missing: bool = _f(
        True,
        "If `tokenizer` does not exist and the data exposes captions, train a byte-level BPE tokenizer on them at build time, in a single-process run only (a multi-rank job refuses with the command that trains it once). Convenient for the tiny CPU run; at scale train it once with `pretrain data tokenizer` and point here.",
    )
    vocab_size: int = _f(
        32000,
        "Vocabulary size when training a tokenizer (not when loading one). 32k is a usual BPE size for English web captions; CLIP used 49,408.",
        ge=1,
    )
    context_length: int = _f(
        77, "Tokens per text, including start/end tokens (CLIP's 77: web alt-texts are short).", ge=2
    )
    width: int = _f(
        768,
        "Transformer width. The M3I text encoder is not published; 768/12/12 is CLIP ViT-L/14's text tower, the usual partner of a ~1B image tower.",
        ge=1,
    )
    depth: int = _f(12, "Transformer blocks (CLIP ViT-L/14 text tower: 12).", ge=1)
    heads: int = _f(12, "Attention heads (width / 64).", ge=1)
    mlp_ratio: float = _f(4.0, "MLP hidden width / width.", gt=0)


@dataclass(frozen=True)
class SemanticConfig(Section):
    """Image-text (and class-name prompt) contrastive term: Fig. 1's weakly/fully supervised targets."""

    weight: float = _f(
        1.0, "Loss weight. Not published; SiameseIM/M3I start from equal weights across terms.", ge=0
    )
    embed_dim: int = _f(
        768,
        "Joint embedding width. 768 = InternImage-H/G's clip_projector output, which then is the image embedding with no extra projection; T–XL get a masked attention-pooling head over the stride-16 tokens plus a linear projection to this width (our choice: T–XL have no official embedding head).",
        ge=1,
    )
    pool_heads: int = _f(
        8, "Heads of the T–XL attention-pooling head (ours; H/G use the official clip_projector's 16).", ge=1
    )
    temperature_init: float = _f(
        0.07, "Initial softmax temperature (CLIP: 0.07; learnable as log(1/T)).", gt=0
    )
    temperature_min: float = _f(
        0.01,
        "Lower clamp of the temperature (CLIP clamps the logit scale at 100), applied after every step.",
        gt=0,
    )
    learnable_temperature: bool = _f(True, "Learn the temperature (CLIP). False keeps `temperature_init`.")
    gather_with_grad: bool = _f(
        True,
        "All-gather embeddings across ranks with gradients; each rank computes the loss of its local rows against the global batch (memory linear in the local batch). False: contrast within the local batch.",
    )
    label_prompt_prob: float = _f(
        0.5,
        "For a sample with both a caption and a label, probability of using its class-name prompt instead of the caption (ours; M3I only says both kinds of target share the text encoder). Captionless labelled samples always use the prompt; labelless captioned samples always use the caption.",
        ge=0,
        le=1,
    )
    prompt_templates: list[str] = _f(
        ["a photo of a {}.", "a picture of a {}.", "{}"],
        "Class-name prompt templates; training samples one per sample, zero-shot averages all (CLIP).",
    )


@dataclass(frozen=True)
class MixConfig(Section):
    """M3I's input mixing (Fig. 2): x = M⊙v_A + (1−M)⊙v_B, B = the batch rolled by one."""

    enabled: bool = _f(
        True,
        "Mix inputs. Off: each image is seen whole (pure contrastive / supervised-through-prompts runs).",
    )
    ratio: float = _f(
        0.5,
        "Fraction of the 16-px blocks taken from B (the mask ratio of the intra-view prediction). The paper shows ≈50–60%; 0.5 keeps both images' semantic terms equally informed.",
        ge=0,
        lt=1,
    )
    min_block: int = _f(
        4,
        "Smallest rectangle (in 16-px blocks) of the BEiT-style blockwise mask (BEiT's 16 at 14×14 is too coarse for the tiny maps of CPU runs; 4 works for both).",
        ge=1,
    )
    aspect_min: float = _f(
        0.3, "Aspect-ratio range [aspect_min, 1/aspect_min] of the mask rectangles (BEiT).", gt=0, le=1
    )


@dataclass(frozen=True)
class DenseConfig(Section):
    """Self-supervised dense term: predict EMA-teacher token features of A's same view and B's other view."""

    intra_weight: float = _f(
        1.0,
        "Weight of the intra-view term (A's same view, at the tokens covered by B). Equal weights: not published.",
        ge=0,
    )
    inter_weight: float = _f(
        1.0,
        "Weight of the inter-view term (every token of B's other view; B's same view when data.views == 1).",
        ge=0,
    )
    intra_on_masked_only: bool = _f(
        True,
        "Intra-view loss only where A is hidden (MAE/SiameseIM convention: visible tokens are nearly free).",
    )
    corr_weight: float = _f(
        0.02,
        "Weight of UniGrad's correlation term (SiameseIM's loss, arXiv 2112.05141): mean over tokens of p̂ᵀ F p̂ with F = E[t̂ t̂ᵀ] over the batch's targets; its gradient pushes predictions away from the directions every target shares, which keeps the online/EMA pair from collapsing to a constant. 0: off.",
        ge=0,
    )
    center_targets: bool = _f(
        True,
        "Subtract the batch mean (all ranks) of the teacher projector output before the LayerNorm (ours, as DINO's centering). The LayerNorm alone normalises each token over channels, so a teacher mapping every token to the same vector still gives a perfect, useless target; centred targets carry only what differs between tokens, so the constant solution scores 2 (cos 0) instead of 0. Without it our CPU runs collapsed (teacher_spread → 1) within ~100 steps.",
    )
    projector_dim: int = _f(
        256, "Width of the online/teacher projector output = target width (SiameseIM's projector: 256).", ge=1
    )
    decoder_depth: int = _f(
        4, "Predictor transformer blocks (SiameseIM: 4-block decoder for ViT-B; M3I's is unpublished).", ge=1
    )
    decoder_width: int = _f(512, "Predictor width (SiameseIM: 512).", ge=1)
    decoder_heads: int = _f(16, "Predictor attention heads (SiameseIM: 16).", ge=1)
    loss: str = _f(
        "cosine",
        '"cosine": normalised L2 = 2 − 2·cos (SiameseIM, M3I Fig. 1); "smooth_l1" on LayerNorm\'d targets.',
        choices=("cosine", "smooth_l1"),
    )
    ema_momentum: float = _f(0.995, "Teacher momentum at step 0 (SiameseIM: 0.995).", gt=0, le=1)
    ema_momentum_end: float = _f(
        1.0,
        "Teacher momentum at the last step, reached on a cosine schedule (BYOL/SiameseIM: 1.0).",
        gt=0,
        le=1,
    )


@dataclass(frozen=True)
class SupervisedConfig(Section):
    """Plain classification (`name: supervised`)."""

    label_smoothing: float = _f(
        0.1, "Cross-entropy label smoothing (InternImage's IN-22K/IN-1K recipes use 0.1).", ge=0, lt=1
    )


@dataclass(frozen=True)
class ZeroShotConfig(Section):
    """Zero-shot evaluation with class-name prompts on a held-out labelled split."""

    every_steps: int = _f(
        0, "Evaluate every N optimizer steps during training (0: only at the end / by command).", ge=0
    )
    split: str = _f(
        "", "Manifest or shard path of the held-out labelled split (empty: the data section's eval split)."
    )
    max_batches: int = _f(0, "Cap the number of eval batches (0: the whole split).", ge=0)
    topk: list[int] = _f([1, 5], "Accuracies to report, logged as `zeroshot/top{k}`.")

    def validate(self) -> None:
        if not self.topk or any(k < 1 for k in self.topk):
            raise FieldError("topk", f"needs values >= 1, got {self.topk}")


@dataclass(frozen=True)
class ObjectiveConfig(Section):
    """What is optimised: the loss terms and the heads, text tower and EMA teacher they need."""

    name: str = _f(
        "m3i", '"supervised" | "contrastive" | "m3i" (see the module docstring).', choices=OBJECTIVE_NAMES
    )
    semantic: SemanticConfig = _f(SemanticConfig, "Image-text / class-prompt contrastive term.")
    dense: DenseConfig = _f(DenseConfig, "Self-supervised intra-/inter-view feature prediction.")
    mix: MixConfig = _f(MixConfig, "Input mixing of two images.")
    text: TextConfig = _f(TextConfig, "Text tower and tokenizer.")
    supervised: SupervisedConfig = _f(SupervisedConfig, "Settings of `name: supervised`.")
    zero_shot: ZeroShotConfig = _f(ZeroShotConfig, "Zero-shot evaluation.")

    def validate(self) -> None:
        if self.dense.ema_momentum > self.dense.ema_momentum_end:
            raise FieldError(
                "dense.ema_momentum",
                f"must be <= dense.ema_momentum_end ({self.dense.ema_momentum_end}), got {self.dense.ema_momentum}",
            )
