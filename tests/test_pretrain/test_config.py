"""Config loading, presets, overrides and the errors that name the bad key or value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from clipforge.pretrain.config import (
    PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    describe_fields,
    load_config,
    save_config,
)


def test_every_preset_is_valid() -> None:
    for name in PRESETS:
        assert isinstance(load_config(name), Config)


def test_overrides_are_typed() -> None:
    cfg = load_config(
        "tiny",
        [
            "data.train=/x/{0..3}.tar",
            "train.steps=7",
            "optim.lr=1e-2",
            "model.lock_image=true",
            "optim.grad_clip=0",
        ],
    )
    assert cfg.data.train == "/x/{0..3}.tar"
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.model.lock_image is True
    assert cfg.optim.grad_clip == 0.0 and isinstance(cfg.optim.grad_clip, float)
    assert cfg.model.name == "clipforge-tiny"  # preset value kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stepz=3", r"unknown key\(s\) \['train.stepz'\]"),
        ("trian.steps=3", r"unknown config section\(s\) \['trian'\]"),
        ("train.steps=many", "train.steps must be an integer, got 'many'"),
        ("train.steps=0", "train.steps must be > 0, got 0"),
        ("optim.lr=-1", "optim.lr must be > 0"),
        ("train.precision=fp8", r"train.precision must be one of \['fp32', 'bf16', 'fp16'\]"),
        ("model.lock_image=maybe", "model.lock_image must be true or false"),
        ("steps=3", "expected section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_batch_must_divide_into_micro_batches() -> None:
    with pytest.raises(ConfigError, match=r"data.batch_size \(30\).*train.accum_steps \(4\)"):
        load_config("tiny", ["data.batch_size=30", "train.accum_steps=4"])


def test_yaml_file_with_base_preset_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("base: tiny\ntrain:\n  steps: 11\nloss:\n  kind: siglip\n")
    cfg = load_config(str(path), ["data.train=shards/"])
    assert (cfg.train.steps, cfg.loss.kind, cfg.model.name) == (11, "siglip", "clipforge-tiny")
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(str(tmp_path / "saved.yaml")) == cfg


def test_bad_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"section 'train' must be a mapping"):
        config_from_dict({"train": 3})


def test_every_field_is_documented() -> None:
    lines = describe_fields().splitlines()
    key_lines = [i for i, line in enumerate(lines) if re.match(r"^  \w+\.\w+ = ", line)]
    assert len(key_lines) >= 40
    for i in key_lines:
        assert lines[i + 1].startswith("      "), f"{lines[i].strip()} has no docstring"
