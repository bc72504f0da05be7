"""BPE tokenizer (trained with `tokenizers` on sample-corpus captions) and the causal text tower."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pretrain.text import TextTokenizer, TextTransformer
from pretrain.text.corpus import iter_captions


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pretrain.data import make_sample_corpus

    root = tmp_path_factory.mktemp("text_corpus")
    make_sample_corpus(str(root), num=120, size=32, seed=3, num_val=8)
    return root


def test_cli_trains_and_round_trips(corpus, capsys):
    from pretrain.cli import main

    out = corpus / "tok.json"
    assert (
        main(
            [
                "data",
                "tokenizer",
                "--manifest",
                str(corpus / "train"),
                "--out",
                str(out),
                "--vocab-size",
                "400",
            ]
        )
        == 0
    )
    tok = TextTokenizer.from_file(out, context_length=32)
    assert 300 < tok.vocab_size <= 400
    assert (tok.pad_id, tok.start_id, tok.end_id) == (0, 1, 2)
    captions = list(iter_captions([str(corpus / "train")], limit=50))
    assert len(captions) == 50
    ids = tok(captions)
    assert ids.shape == (50, 32)
    for row, caption in zip(ids, captions):
        end = int(tok.end_index(row[None])[0])
        assert row[0] == tok.start_id and row[end] == tok.end_id and (row[end + 1 :] == tok.pad_id).all()
        assert tok.decode(row).strip() == caption.lower()  # lossless up to the lowercasing normaliser
    # unseen words and other scripts still encode (byte-level BPE: no unknown token)
    odd = "Zebra ünïcode 猫 42"
    assert tok.decode(tok([odd])[0]).strip() == odd.lower()
    # the command's inspection mode prints the ids
    capsys.readouterr()
    assert main(["data", "tokenizer", "--load", str(out), "--text", "a photo of a star."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1])["decoded"] == "a photo of a star."


def test_truncation_keeps_end_token():
    tok = TextTokenizer.train(
        ["one two three four five six seven eight"] * 10, vocab_size=300, context_length=6
    )
    ids = tok(["one two three four five six seven eight", "one"])
    assert ids.shape == (2, 6)
    assert ids[0, -1] == tok.end_id and tok.end_index(ids).tolist() == [5, 2]


def test_user_tokenizer_with_other_special_tokens(tmp_path):
    """A WordPiece-style vocabulary ([CLS]/[SEP]/[PAD]) is used through the same wrapper."""
    vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[UNK]": 3, "a": 4, "red": 5, "star": 6}
    user = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    user.save(str(tmp_path / "user.json"))
    tok = TextTokenizer.from_file(tmp_path / "user.json", context_length=8)
    assert tok(["a red star"])[0].tolist() == [1, 4, 5, 6, 2, 0, 0, 0]


def test_text_tower_ignores_padding_and_context():
    torch.manual_seed(0)
    tower = TextTransformer(vocab_size=50, embed_dim=16, context_length=12, width=32, depth=2, heads=4).eval()
    ids = torch.tensor([[1, 7, 8, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
    other_pad = ids.clone()
    other_pad[0, 4:] = 9  # anything after the end token (causal attention: it never reaches the end token)
    end = torch.tensor([3])
    a, b = tower(ids, end), tower(other_pad, end)
    assert a.shape == (1, 16)
    torch.testing.assert_close(a, b)
    c = tower(torch.tensor([[1, 7, 9, 2, 0, 0, 0, 0, 0, 0, 0, 0]]), end)
    assert not torch.allclose(a, c)
