"""Round trips through every format keep every tensor bit-exact and the model's outputs equal; wrong
variants, truncated files and existing outputs are refused with clear messages and leave nothing behind."""

from __future__ import annotations

import json
import struct
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from pretrain.cli import main as cli_main
from pretrain.convert import ConvertError, convert, load_pretrained, open_source
from pretrain.convert.spec import expected_shapes, record_from_variant
from pretrain.models import create_model

TINY_T = ("internimage_t", dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 2, 4], drop_path_rate=0.0))
TINY_S = ("internimage_s", dict(channels=8, depths=[1, 1, 2, 1], groups=[1, 2, 2, 4], drop_path_rate=0.0))
TINY_H = (
    "internimage_h",
    dict(
        channels=16,
        depths=[1, 1, 2, 1],
        groups=[1, 2, 2, 4],
        level2_post_norm_block_ids=[1],
        drop_path_rate=0.0,
    ),
)
TINIES = {"t": TINY_T, "s": TINY_S, "h": TINY_H}


def _model(which: str, num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    name, kwargs = TINIES[which]
    model = create_model(name, num_classes=num_classes, **kwargs)
    with torch.no_grad():  # non-trivial values everywhere (layer scales, norms, BN statistics)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.01)
    return model.eval()


def _official(path: Path, model: torch.nn.Module) -> Path:
    torch.save({"model": model.state_dict()}, path)
    return path


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("which", ["t", "s", "h"])
def test_round_trip_every_format_bit_exact(which, tmp_path):
    name, kwargs = TINIES[which]
    model = _model(which)
    want = model.state_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_out = model(x)

    src = _official(tmp_path / "a.pth", model)
    claim = dict(model=name, model_kwargs=kwargs)
    convert(src, tmp_path / "b.safetensors", **claim)
    convert(tmp_path / "b.safetensors", tmp_path / "c", to="safetensors")  # the record travels with the file
    convert(tmp_path / "c", tmp_path / "d.pt", to="consolidated")
    convert(tmp_path / "d.pt", tmp_path / "e.pth", **claim)

    _assert_same(torch.load(tmp_path / "e.pth", weights_only=True)["model"], want)
    config = json.loads((tmp_path / "c" / "config.json").read_text())["internimage_pretrain"]
    assert config["variant"] == name and config["kwargs"]["channels"] == kwargs["channels"]
    for path in ("b.safetensors", "c", "d.pt", "e.pth"):
        fresh = create_model(name, num_classes=10, **kwargs).eval()
        report = load_pretrained(tmp_path / path, fresh)
        assert len(report.loaded) == len(want) and not report.missing
        with torch.no_grad():
            assert torch.equal(fresh(x), want_out), path


@pytest.mark.parametrize("which", ["s", "h"])
def test_hf_layout_round_trip(which, tmp_path):
    name, kwargs = TINIES[which]
    model = _model(which)
    want = model.state_dict()
    convert(_official(tmp_path / "a.pth", model), tmp_path / "hf", to="hf", model=name, model_kwargs=kwargs)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "intern_image" and config["channels"] == kwargs["channels"]
    keys = set(open_source(tmp_path / "hf").tensors)
    assert all(k.startswith("model.") for k in keys)
    assert not any(k.split(".")[1] in ("head", "conv_head", "clip_projector", "fc_norm") for k in keys)
    assert not any(".gamma" in k for k in keys)
    if which == "s":
        assert "model.levels.0.blocks.0.layer_scale1" in keys

    convert(tmp_path / "hf", tmp_path / "back.pth")
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    assert set(back) == {
        k for k in want if not k.startswith(("head.", "conv_head.", "dcnv3_head", "clip", "fc_norm"))
    }
    for key, value in back.items():
        assert torch.equal(value, want[key]), key

    # the HF port has no heads: a model keeps its own and every backbone output is identical
    other = _model(which, seed=1)
    with torch.no_grad():
        for k, v in other.state_dict().items():
            if k not in back:
                v.copy_(want[k])
    report = load_pretrained(tmp_path / "hf", other)
    assert any("no head modules" in n for n in report.notes)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(x), model(x))


def test_dtype_cast(tmp_path):
    model = _model("t")
    src = _official(tmp_path / "a.pth", model)
    convert(src, tmp_path / "b.safetensors", dtype="bf16", **dict(zip(("model", "model_kwargs"), TINY_T)))
    got = open_source(tmp_path / "b.safetensors").tensors
    for key, value in model.state_dict().items():
        tensor = got[key].load()
        if value.is_floating_point():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, value.to(torch.bfloat16)), key
        else:  # BatchNorm's num_batches_tracked stays int64
            assert tensor.dtype == value.dtype and torch.equal(tensor, value), key


def _zeros(variant: str, num_classes: int) -> dict[str, torch.Tensor]:
    shapes = expected_shapes(record_from_variant(variant, num_classes)["kwargs"])
    return {
        k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float32)
        for k, s in shapes.items()
    }


def test_official_22k_head_detected_and_loadable(tmp_path):
    torch.save({"model": _zeros("internimage_t", 21841)}, tmp_path / "t22k.pth")
    report = convert(tmp_path / "t22k.pth", tmp_path / "t22k.safetensors")  # no --model: detected
    assert report.variant == "internimage_t" and report.kwargs["num_classes"] == 21841
    with torch.device("meta"):
        model = create_model("internimage_t", num_classes=1000)
    model = model.to_empty(device="cpu")
    with pytest.raises(ConvertError, match=r"head\.weight.*drop_head"):
        load_pretrained(tmp_path / "t22k.safetensors", model)
    report = load_pretrained(tmp_path / "t22k.safetensors", model, drop_head=True)
    assert sorted(report.skipped_head) == ["head.bias", "head.weight"]


def test_wrong_variant_refused_naming_mismatches_and_likely_variant(tmp_path):
    torch.save({"model": _zeros("internimage_s", 1000)}, tmp_path / "s.pth")
    dst = tmp_path / "out.safetensors"
    with pytest.raises(ConvertError) as err:
        convert(tmp_path / "s.pth", dst, model="internimage_b")
    message = str(err.value)
    assert (
        "is not internimage_b" in message and "patch_embed.conv1.weight: checkpoint [40, 3, 3, 3]" in message
    )
    assert "looks like internimage_s" in message
    assert not dst.exists() and not _leftovers(tmp_path)

    with torch.device("meta"):
        model = create_model("internimage_t")
    with pytest.raises(ConvertError, match="does not fit InternImage"):
        load_pretrained(tmp_path / "s.pth", model.to_empty(device="cpu"))


def test_unknown_model_without_claim_refused(tmp_path):
    src = _official(tmp_path / "a.pth", _model("t"))
    with pytest.raises(ConvertError, match="matches no registered InternImage variant.*--model"):
        convert(src, tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("fmt", ["official", "safetensors", "hf"])
def test_truncated_inputs_refused_and_no_output(fmt, tmp_path):
    name, kwargs = TINY_T
    good = {"official": tmp_path / "g.pth", "safetensors": tmp_path / "g.safetensors", "hf": tmp_path / "g"}[
        fmt
    ]
    _official(tmp_path / "g.pth", _model("t"))
    if fmt != "official":
        convert(tmp_path / "g.pth", good, to=fmt, model=name, model_kwargs=kwargs)
    data_file = good / "model.safetensors" if fmt == "hf" else good
    data = data_file.read_bytes()
    data_file.write_bytes(data[: len(data) * 2 // 3])
    for dst, to in ((tmp_path / "out.pth", "official"), (tmp_path / "outdir", "hf")):
        with pytest.raises(ConvertError, match="truncated"):
            convert(good, dst, to=to, model=name, model_kwargs=kwargs)
        assert not dst.exists()
    assert not _leftovers(tmp_path)


def test_safetensors_header_lying_about_size_is_refused(tmp_path):
    # a header that promises more data than the file has (a partial copy of the data section)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(ConvertError, match="truncated"):
        open_source(tmp_path / "bad.safetensors")


def test_existing_output_needs_overwrite(tmp_path):
    name, kwargs = TINY_T
    src = _official(tmp_path / "a.pth", _model("t"))
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep").write_text("x")
    with pytest.raises(ConvertError, match="exists"):
        convert(src, dst, to="hf", model=name, model_kwargs=kwargs)
    assert (dst / "keep").exists()
    convert(src, dst, to="hf", model=name, model_kwargs=kwargs, overwrite=True)
    assert not (dst / "keep").exists() and (dst / "model.safetensors").exists()
    assert not _leftovers(tmp_path)


def test_pickled_objects_need_allow_pickle(tmp_path):
    name, kwargs = TINY_T
    model = _model("t")
    torch.save({"model": model.state_dict(), "config": Namespace(lr=1.0), "epoch": 3}, tmp_path / "a.pth")
    with pytest.raises(ConvertError, match="allow-pickle"):
        convert(tmp_path / "a.pth", tmp_path / "b.pth", model=name, model_kwargs=kwargs)
    report = convert(
        tmp_path / "a.pth", tmp_path / "b.pth", model=name, model_kwargs=kwargs, allow_pickle=True
    )
    assert any("ignored" in n for n in report.notes)
    _assert_same(torch.load(tmp_path / "b.pth", weights_only=True)["model"], model.state_dict())


def test_backbone_prefix_in_full_module_state(tmp_path):
    name, kwargs = TINY_T
    student, teacher = _model("t", seed=0), _model("t", seed=1)
    full = {f"backbone.{k}": v for k, v in student.state_dict().items()}
    full |= {f"teacher.{k}": v for k, v in teacher.state_dict().items()}
    full["proj.weight"] = torch.randn(3, 3)
    torch.save(full, tmp_path / "full.pt")

    report = convert(tmp_path / "full.pt", tmp_path / "s.pth", model=name, model_kwargs=kwargs)
    assert report.prefix == "backbone."
    _assert_same(torch.load(tmp_path / "s.pth", weights_only=True)["model"], student.state_dict())
    convert(tmp_path / "full.pt", tmp_path / "t.pth", model=name, model_kwargs=kwargs, prefix="teacher")
    _assert_same(torch.load(tmp_path / "t.pth", weights_only=True)["model"], teacher.state_dict())
    with pytest.raises(ConvertError, match="no InternImage backbone under prefix 'ema.'"):
        convert(tmp_path / "full.pt", tmp_path / "x.pth", model=name, model_kwargs=kwargs, prefix="ema.")

    # load_pretrained into a module that has a `.backbone`
    holder = torch.nn.Module()
    holder.backbone = create_model(name, num_classes=10, **kwargs)
    report = load_pretrained(tmp_path / "full.pt", holder)
    assert report.target == "model.backbone"
    _assert_same(holder.backbone.state_dict(), student.state_dict())


def test_cli(tmp_path, capsys):
    name, kwargs = TINY_T
    src = _official(tmp_path / "a.pth", _model("t"))
    claim = ["--model", name, "--model-kwargs", json.dumps(kwargs)]
    assert cli_main(["convert", str(src), str(tmp_path / "hf"), "--to", "hf", "--dtype", "fp16", *claim]) == 0
    out = capsys.readouterr()
    assert "-> " in out.out and "hf" in out.out
    assert open_source(tmp_path / "hf").tensors["model.patch_embed.conv1.weight"].dtype == torch.float16

    assert cli_main(["convert", str(src), str(tmp_path / "b.pth"), "--model", "internimage_xl", "-q"]) == 2
    assert "is not internimage_xl" in capsys.readouterr().err
    assert not (tmp_path / "b.pth").exists()
    assert cli_main(["convert", str(src), str(tmp_path / "noext"), *claim]) == 2
    assert "--to" in capsys.readouterr().err


def test_released_hf_port_directory_without_our_record(tmp_path):
    """An HF-port directory as released (config.json with the constructor keywords, weights in
    pytorch_model.bin, no record of ours) converts to the official format with no flags."""
    name, kwargs = TINY_S
    model = _model("s")
    convert(_official(tmp_path / "a.pth", model), tmp_path / "hf", to="hf", model=name, model_kwargs=kwargs)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config["internimage_pretrain"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = {k: v.load() for k, v in open_source(tmp_path / "hf").tensors.items()}
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "hf" / "pytorch_model.bin")

    report = convert(tmp_path / "hf", tmp_path / "back.pth")
    assert report.src_format == "hf" and report.kwargs["channels"] == kwargs["channels"]
    back = torch.load(tmp_path / "back.pth", weights_only=True)["model"]
    for key, value in back.items():
        assert torch.equal(value, model.state_dict()[key]), key
