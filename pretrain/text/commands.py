"""`pretrain data tokenizer`: train a byte-level BPE tokenizer on corpus captions, or inspect a tokenizer.json.

Registered by `pretrain.data.commands` (it calls `add_arguments(parser)` and `run(args)`).

  pretrain data tokenizer --manifest data/sample/train --out data/sample/tokenizer.json --vocab-size 4096
  pretrain data tokenizer --load my/tokenizer.json --text "a photo of a dog"
"""

from __future__ import annotations

import itertools
import json
import time


def add_arguments(parser) -> None:
    parser.add_argument(
        "--manifest",
        action="append",
        default=[],
        metavar="URL",
        help="corpus manifest (or corpus folder) whose captions to train on; repeatable",
    )
    parser.add_argument(
        "--text-file",
        action="append",
        default=[],
        metavar="PATH",
        help="plain-text file, one caption per line; repeatable",
    )
    parser.add_argument("--out", default="tokenizer.json", help="where to write the trained tokenizer.json")
    parser.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary size (default 32000)")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="minimum pair count of a merge (default 2)"
    )
    parser.add_argument("--limit", type=int, default=0, help="train on at most this many captions (0: all)")
    parser.add_argument("--no-lowercase", action="store_true", help="keep case (default: lowercase, as CLIP)")
    parser.add_argument(
        "--no-label-prompts",
        action="store_true",
        help="do not add the manifests' class-name prompts to the training text",
    )
    parser.add_argument(
        "--load", metavar="PATH", help="inspect an existing tokenizer.json instead of training"
    )
    parser.add_argument("--text", action="append", default=[], help="text(s) to encode with the result")
    parser.add_argument("--context-length", type=int, default=77)


def run(args) -> int:
    from .tokenizer import TextTokenizer

    if args.load:
        tok = TextTokenizer.from_file(args.load, args.context_length)
    else:
        if not args.manifest and not args.text_file:
            print("pretrain data tokenizer: give --manifest and/or --text-file to train on, or --load PATH")
            return 2
        t0 = time.perf_counter()
        texts = _training_texts(args)
        counter = _Counter(texts)
        tok = TextTokenizer.train(
            counter,
            args.vocab_size,
            args.context_length,
            min_frequency=args.min_frequency,
            lowercase=not args.no_lowercase,
        )
        tok.save(args.out)
        print(f"trained on {counter.n} texts in {time.perf_counter() - t0:.1f}s -> {args.out}")
    info = {
        "vocab_size": tok.vocab_size,
        "start_id": tok.start_id,
        "end_id": tok.end_id,
        "pad_id": tok.pad_id,
    }
    print(json.dumps(info))
    for text in args.text:
        ids = tok([text])[0]
        n = int(tok.end_index(ids[None])[0]) + 1
        print(json.dumps({"text": text, "ids": ids[:n].tolist(), "decoded": tok.decode(ids[:n]).strip()}))
    return 0


def _training_texts(args):
    from .corpus import iter_captions, label_names_of

    streams = []
    if args.manifest:
        streams.append(iter_captions(args.manifest))
    for path in args.text_file:
        streams.append(line.strip() for line in open(path, encoding="utf-8") if line.strip())
    texts = itertools.chain(*streams)
    if args.limit:
        texts = itertools.islice(texts, args.limit)
    if args.manifest and not args.no_label_prompts:
        from ..objectives.config import SemanticConfig

        templates = SemanticConfig().prompt_templates
        prompts = [t.format(n) for n in label_names_of(args.manifest) for t in templates]
        texts = itertools.chain(texts, prompts)
    return texts


class _Counter:
    """Iterable that counts what it yields (the trainer consumes the iterator once)."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        for x in self.it:
            self.n += 1
            yield x
