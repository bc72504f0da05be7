"""Text side of the semantic objective: a byte-level BPE tokenizer (`tokenizers`) and a CLIP-style tower."""

from .tokenizer import TextTokenizer, train_tokenizer
from .tower import TextTransformer

__all__ = ["TextTokenizer", "TextTransformer", "train_tokenizer"]
