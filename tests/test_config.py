"""The run config schema: strict loading, typed overrides, round trips, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_yaml_text,
    describe,
    dump_config,
    load_config,
)

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


def test_defaults_load_and_are_frozen():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    with pytest.raises(AttributeError):
        cfg.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("optim.lrr=1e-3", "unknown config key 'optim.lrr'; did you mean 'optim.lr'"),
        ("engin.zero_stage=2", "unknown config key 'engin'; did you mean 'engine'"),
        ("engine.zero_stag=2", "did you mean 'engine.zero_stage'"),
        ("checkpoint.evry_steps=5", "did you mean 'checkpoint.every_steps'"),
    ],
)
def test_unknown_keys_name_the_key_and_the_closest_valid_one(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  weight_decai: 0.1\n")
    with pytest.raises(ConfigError, match=r"optim\.weight_decai.*did you mean 'optim\.weight_decay'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("engine.zero_stage=two", "engine.zero_stage: expected an integer"),
        ("engine.precision=bf61", "engine.precision: 'bf61' is not one of"),
        ("optim.betas=[0.9]", "optim.betas: expected 2 values"),
        ("ema.enabled=maybe", "ema.enabled: expected true/false"),
        ("optim.lr=fast", "optim.lr: expected a number"),
    ],
)
def test_mistyped_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_typed_overrides():
    cfg = load_config(
        overrides=[
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string: still a float here
            "optim.betas=[0.9, 0.95]",
            "engine.zero_stage=3",
            "engine.clip_grad=null",
            "model.overrides.depths=[1, 1, 2, 1]",
            "ema.enabled=true",
        ]
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.engine.zero_stage == 3 and cfg.engine.clip_grad is None
    assert cfg.model.overrides == {"depths": [1, 1, 2, 1]}
    assert cfg.ema.enabled is True


def test_override_must_be_key_value():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])


def test_resolved_config_round_trips():
    cfg = load_config(overrides=["engine.zero_stage=2", "model.overrides.channels=16", "name=x"])
    again = config_from_yaml_text(dump_config(cfg))
    assert again == cfg


def test_every_key_of_every_section_is_documented():
    lines = describe()
    assert any(
        line.strip().startswith("engine.zero_stage: int = 1 (>= 0, <= 3)  # ZeRO stage") for line in lines
    )
    keys = [line.strip() for line in lines if "  # " in line]
    assert any(k.startswith("objective.dense.ema_momentum:") for k in keys)
    assert any(k.startswith("data.sources[].uri:") for k in keys)
    assert any(k.startswith("data.augment.hflip:") for k in keys)
    for line in lines:
        doc = line.split("  # ", 1)[1] if "  # " in line else line.split("] ", 1)[1]
        assert doc.strip(), f"undocumented: {line}"
    assert len(keys) >= 100  # every leaf key, all sections


def sections(cls=RunConfig):
    """Every section type reachable from RunConfig (sub-sections and lists of sections included)."""
    import dataclasses
    import typing

    found = [cls]
    for tp in typing.get_type_hints(cls).values():
        item = (typing.get_args(tp) or (None,))[0]
        for t in (tp, item):
            if dataclasses.is_dataclass(t):
                found += [s for s in sections(t) if s not in found]
    return found


@pytest.mark.parametrize("cls", sections(), ids=lambda c: c.__name__)
def test_every_section_is_frozen(cls):
    import dataclasses

    assert cls.__dataclass_params__.frozen, f"{cls.__name__} is mutable"
    obj = cls()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, dataclasses.fields(cls)[0].name, None)


def test_dcn_backend_choices_are_the_registered_backends():
    from pretrain.config import DCN_BACKENDS
    from pretrain.ops.dispatch import _BACKENDS

    assert set(DCN_BACKENDS) == {"auto", *_BACKENDS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.schedule.total_steps > 0


def test_output_dir_url_is_never_mangled_by_path():
    from pretrain.config import save_config
    from pretrain.data import storage

    cfg = load_config(overrides=["output_dir=s3://bucket/run/"])
    assert cfg.checkpoint_dir() == "s3://bucket/run/checkpoints"  # Path() made it s3:/bucket/run/checkpoints
    url = "memory://pretrain-test/run/config.yaml"
    save_config(cfg, url)
    assert config_from_yaml_text(storage.read_bytes(url).decode()) == cfg


def test_describe_config_command_prints_every_key(capsys):
    from pretrain.cli import main

    assert main(["train", "--describe-config"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == describe()
    assert any(
        line.strip().startswith("objective.text.train_if_missing: bool = True  # ") for line in printed
    )
