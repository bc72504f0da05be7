"""Byte-level BPE tokenizer: trained on corpus captions with the `tokenizers` library, or any user tokenizer.json.

We never tokenize by hand and never download: `train_tokenizer` learns merges from an iterator of captions,
`TextTokenizer.from_file` loads ours or a user's file (a HF `tokenizer.json`). The wrapper adds the start/end
tokens itself (the file's own post-processor, padding and truncation are bypassed) so every tokenizer gives the
same layout: [start] tokens... [end] [pad]..., truncated to `context_length` with the end token kept.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, START, END = "<|pad|>", "<|startoftext|>", "<|endoftext|>"

# Names other tokenizers use for the same roles (CLIP, RoBERTa/GPT-2, BERT, Llama-style), tried in order.
_START_NAMES = (START, "<s>", "[CLS]", "<bos>", "<|begin_of_text|>")
_END_NAMES = (END, "</s>", "[SEP]", "<eos>", "<|end_of_text|>")
_PAD_NAMES = (PAD, "<pad>", "[PAD]")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 32000, min_frequency: int = 2, lowercase: bool = True
) -> Tokenizer:
    """Learn a byte-level BPE (GPT-2/CLIP family) on `texts`; the special tokens take ids 0, 1, 2.

    Byte-level: any UTF-8 caption encodes without unknown tokens, so web alt-text in any script is safe.
    Lowercasing (CLIP does the same) spends the vocabulary on words rather than case variants.
    """
    tok = Tokenizer(models.BPE())
    norms = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tok.normalizer = normalizers.Sequence(norms)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[PAD, START, END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


class TextTokenizer:
    """Batch encoder to fixed-length id tensors for the text tower.

    `__call__(texts) -> ids` long (B, context_length); `end_index(ids)` gives each row's end-token position
    (the feature the tower pools). Works with any `tokenizers.Tokenizer`: missing start/pad tokens are
    tolerated (no start token; pad with the end token), a missing end token is an error.
    """

    def __init__(self, tokenizer: Tokenizer, context_length: int = 77):
        if context_length < 2:
            raise ValueError("context_length must be >= 2")
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.start_id = _first_id(tokenizer, _START_NAMES)
        self.end_id = _first_id(tokenizer, _END_NAMES)
        if self.end_id is None:
            raise ValueError(f"tokenizer has none of the end tokens {_END_NAMES}; add one to its vocabulary")
        pad = _first_id(tokenizer, _PAD_NAMES)
        self.pad_id = self.end_id if pad is None else pad

    @classmethod
    def from_file(cls, path: str | os.PathLike, context_length: int = 77) -> TextTokenizer:
        return cls(Tokenizer.from_file(str(path)), context_length)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 32000, context_length: int = 77, **kw
    ) -> TextTokenizer:
        return cls(train_tokenizer(texts, vocab_size, **kw), context_length)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a concurrent reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self.tokenizer.save(str(tmp))
        os.replace(tmp, path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        body = self.context_length - 1 - (self.start_id is not None)
        ids = torch.full((len(encodings), self.context_length), self.pad_id, dtype=torch.long)
        for row, enc in enumerate(encodings):
            seq = ([self.start_id] if self.start_id is not None else []) + enc.ids[:body] + [self.end_id]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids

    def end_index(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) ids -> (B,) position of the first end token (the row's last real token)."""
        is_end = ids == self.end_id
        return is_end.to(torch.int8).argmax(dim=-1)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _first_id(tokenizer: Tokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            return idx
    return None
