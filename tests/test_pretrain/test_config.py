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


def test_caption_shares_add_up_to_at_most_one() -> None:
    cfg = load_config("tiny", ["data.caption_subsets=0.3", "data.caption_name_only=0.5"])
    assert (cfg.data.caption_subsets, cfg.data.caption_name_only) == (0.3, 0.5)
    message = r"data.caption_subsets \+ data.caption_name_only must be <= 1, got 1.1"
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["data.caption_subsets=0.6", "data.caption_name_only=0.5"])
    with pytest.raises(ConfigError, match=r"data.caption_name_only must be in \[0, 1\]"):
        load_config("tiny", ["data.caption_name_only=-0.1"])


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


# ----------------------------------------------------------------------------- train.eval


def test_eval_sets_from_yaml_and_from_set_overrides(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(
        "base: tiny\n"
        "train:\n"
        "  eval_callback: retrieval\n"
        "  eval_every: 100\n"
        "  eval:\n"
        "    - {name: val, data: val-shards/, k: [10, 1, 5, 1], limit: 512}\n"
        "    - {name: test, data: 'test/{000..003}.tar', batch_size: 64}\n"
    )
    cfg = load_config(str(f))
    val, test = cfg.train.eval
    assert (val.name, val.data, val.k, val.limit, val.batch_size) == (
        "val", "val-shards/", (1, 5, 10), 512, 256
    )  # fmt: skip
    assert (test.name, test.k, test.limit, test.batch_size) == ("test", (1, 5, 10), None, 64)
    # --set NAME.KEY changes one key of an existing set, or adds a set (in order of mention)
    cfg = load_config(
        str(f),
        [
            "train.eval.test.k=1,10",
            "train.eval.extra.data=x/",
            "train.eval.extra.image_id_field=source.id",
        ],
    )
    assert [s.name for s in cfg.train.eval] == ["val", "test", "extra"]
    assert cfg.train.eval[1].k == (1, 10) and cfg.train.eval[1].batch_size == 64
    assert cfg.train.eval[2].image_id_field == "source.id"
    # the whole list as one YAML flow value replaces it
    cfg = load_config(str(f), ["train.eval=[{name: only, data: o/, k: 5}]"])
    assert [(s.name, s.k) for s in cfg.train.eval] == [("only", (5,))]
    assert load_config(str(f), ["train.eval=[]"]).train.eval == ()


def test_eval_sets_round_trip_through_config_yaml(tmp_path: Path) -> None:
    from clipforge.pretrain.config import RESUME_MUTABLE, config_differences

    cfg = load_config(
        "tiny",
        ["train.eval_callback=retrieval", "train.eval.a.data=a/", "train.eval.b.data=b/"],
    )
    save_config(cfg, tmp_path / "config.yaml")
    import yaml

    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["eval"][1] == {
        "name": "b", "data": "b/", "k": [1, 5, 10], "limit": None, "batch_size": 256,
        "image_id_field": None,
    }  # fmt: skip
    assert config_from_dict(saved) == cfg
    assert config_differences(saved, cfg) == {}  # lists read back equal the config's tuples
    changed = load_config("tiny", ["train.eval_callback=retrieval", "train.eval.a.data=a/"])
    assert set(config_differences(saved, changed)) == {"train.eval"}
    assert "train.eval" in RESUME_MUTABLE  # evaluation does not change what is trained
    # a saved config from before train.eval existed compares as "no sets"
    del saved["train"]["eval"]
    assert config_differences(saved, load_config("tiny", ["train.eval_callback=retrieval"])) == {}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.eval.val.data=d"], r"train\.eval_callback must be set .* when train\.eval"),
        (["train.eval.data=d"], r"expected train\.eval\.NAME\.KEY=value, KEY one of \['data'"),
        (["train.eval.val.limit=3"], r"train\.eval\.val: missing required key\(s\) \['data'\]"),
        (["train.eval.v.data=d", "train.eval.v.k=0"], r"train\.eval\.v\.k must be K values >= 1"),
        (["train.eval.v.data=d", "train.eval.v.k=a,b"], r"train\.eval\.v\.k must be integers"),
        (["train.eval.v.data=d", "train.eval.v.limit=0"], r"train\.eval\.v\.limit must be >= 1"),
        (["train.eval.v.data=d", "train.eval.v.batch_size=x"], r"v\.batch_size must be an int"),
        (
            ["train.eval.v.data=d", "train.eval.v.bogus=1"],
            r"unknown key\(s\) \['train\.eval\.v\.bo",
        ),
        (["train.eval.v.data="], r"train\.eval\.v\.data must be a SHARDS path"),
        (["train.eval=[{name: a/b, data: d}]"], r"name must be letters, digits.*'a/b'"),
        (["train.eval=[{name: a, data: d}, {name: a, data: e}]"], r"names must be unique.*'a'"),
        (["train.eval=[{data: d}]"], r"train\.eval\[0\]: missing required key\(s\) \['name'\]"),
        (["train.eval=[3]"], r"train\.eval\[0\] must be a mapping"),
        (["train.eval=5"], r"train\.eval must be a list"),
        (["train.steps.x=1"], r"train\.steps has no sub-keys"),
    ],
)
def test_bad_eval_sets_name_the_key(overrides: list[str], message: str) -> None:
    with_callback = ["train.eval_callback=retrieval"] if "eval_callback" not in message else []
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*with_callback, *overrides])


def test_eval_set_keys_are_documented() -> None:
    text = describe_fields()
    for key in ("name", "data", "k", "limit", "batch_size", "image_id_field"):
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"train.eval[].{key} "))
        following = text.splitlines()[text.splitlines().index(line) + 1]
        assert following.startswith("        "), f"train.eval[].{key} has no docstring"
    assert "train.eval[].data = (required)" in text
