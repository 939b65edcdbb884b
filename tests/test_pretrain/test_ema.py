"""Weight averaging (``train.ema_decay``): the EMA update against hand-computed values, the
trainer's exported model against an EMA replayed from each step's raw weights, crash-resume
(both checkpoint forms) bit for bit equal to an unbroken run, turning it on or off on resume,
FSDP2 on 2 gloo ranks, and the config's validation."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from clipforge.pretrain.checkpoint import list_checkpoints, load_checkpoint
from clipforge.pretrain.config import ConfigError, load_config
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.ema import ModelEma, ema_decay_at, with_ema_weights
from clipforge.pretrain.models import OPEN_CLIP_WEIGHTS_NAME
from clipforge.pretrain.parallelize import full_model_state_dict
from clipforge.pretrain.train import Trainer, train
from tests.test_pretrain.launch import cut_back, tiny_run_args, torchrun_two_ranks

STEPS = 4
SHARDED = "train.checkpoint_format=sharded"


# ----------------------------------------------------------------------------- the update
def test_the_decay_warms_up_as_tensorflow_num_updates() -> None:
    assert ema_decay_at(0.9, 0, warmup=True) == pytest.approx(1 / 10)
    assert ema_decay_at(0.9, 1, warmup=True) == pytest.approx(2 / 11)
    assert ema_decay_at(0.9, 80, warmup=True) == 0.9  # 81/90 = 0.9: the cap from here on
    assert ema_decay_at(0.999, 5, warmup=False) == 0.999


@pytest.mark.parametrize("warmup", [False, True])
def test_three_updates_equal_the_hand_computed_average(warmup: bool) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not averaged
    decay = 0.8
    ema = ModelEma(model, decay, warmup)
    assert set(ema.state_dict()) == {"weight"}
    expected = model.weight.detach().double().clone()  # the EMA starts at the weights
    decays = [0.1, 2 / 11, 3 / 12] if warmup else [decay] * 3  # min(0.8, (1+n)/(10+n))
    for d in decays:
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))  # "an optimizer step"
        ema.update()
        expected = d * expected + (1 - d) * model.weight.detach().double()
        torch.testing.assert_close(ema.state_dict()["weight"].double(), expected)
    assert ema.updates == 3
    assert not torch.allclose(ema.state_dict()["weight"], model.weight)

    raw = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in():
        assert torch.equal(model.weight, ema.state_dict()["weight"])
        assert torch.equal(model.bias, raw["bias"])
    for key, value in model.state_dict().items():  # the raw weights back, bit for bit
        assert torch.equal(value, raw[key]), key

    exported = with_ema_weights(model.state_dict(), ema.full_state_dict())
    assert torch.equal(exported["weight"], ema.state_dict()["weight"])
    assert torch.equal(exported["bias"], raw["bias"])

    other = ModelEma(model, decay, warmup)
    other.load_full_state_dict(ema.full_state_dict(), where="test")
    assert torch.equal(other.state_dict()["weight"], ema.state_dict()["weight"])
    with pytest.raises(ValueError, match="ckpt-x: EMA of weight has shape"):
        other.load_full_state_dict({"weight": torch.zeros(3, 3)}, where="ckpt-x")


def test_the_ema_is_float32_for_a_bf16_model() -> None:
    model = nn.Linear(4, 4).to(torch.bfloat16)
    ema = ModelEma(model, 0.5, warmup=False)
    assert ema.state_dict()["weight"].dtype == torch.float32
    ema.update()  # a bf16 weight lerped into the float32 shadow
    torch.testing.assert_close(ema.state_dict()["weight"], model.weight.float())


def test_the_decay_is_validated() -> None:
    for bad in ("1.0", "-0.1", "1.5", "nan"):
        with pytest.raises(ConfigError, match=r"train\.ema_decay must be in \[0, 1\)"):
            load_config("tiny", [f"train.ema_decay={bad}"])
    assert load_config("tiny", ["train.ema_decay=0.999"]).train.ema_decay == 0.999


# ----------------------------------------------------------------------------- the trainer
def _overrides(demo: Path, run: Path, *extra: str) -> list[str]:
    return tiny_run_args(demo, run, 16, STEPS, 1, "--set", "train.keep_checkpoints=10", *extra)[
        3::2
    ]


def _config(demo: Path, run: Path, *extra: str) -> Any:
    return load_config("tiny", _overrides(demo, run, *extra))


def _exported(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model" / OPEN_CLIP_WEIGHTS_NAME, map_location="cpu")


def _ckpt(run: Path, step: int) -> dict[str, Any]:
    (path,) = [p for s, p in list_checkpoints(run / "checkpoints") if s == step]
    return load_checkpoint(path)


def _assert_equal_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_the_exported_model_is_the_ema_replayed_from_each_steps_weights(
    demo: Path, tmp_path: Path
) -> None:
    run, decay = tmp_path / "run", 0.6
    evaluated: dict[int, dict[str, torch.Tensor]] = {}

    def evaluate(model: nn.Module, step: int) -> dict[str, float]:
        evaluated[step] = {k: v.clone() for k, v in model.state_dict().items()}
        return {}

    trainer = Trainer(
        _config(demo, run, "--set", f"train.ema_decay={decay}", "--set", "train.eval_every=2"),
        DistInfo(0, 1, 0, torch.device("cpu"), None),
        eval_callback=evaluate,
    )
    try:
        # cloned: on the CPU the state dict's tensors are the parameters themselves
        initial = {k: v.clone() for k, v in full_model_state_dict(trainer.model).items()}
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
    finally:
        trainer.close()
    # each step's raw weights are in its checkpoint (train.checkpoint_every=1)
    raw = {s: _ckpt(run, s)["model"] for s in range(1, STEPS + 1)}
    replay = {n: initial[n].double() for n in trainable}
    for step in range(1, STEPS + 1):
        d = min(decay, (1 + step - 1) / (10 + step - 1))  # train.ema_warmup=true (default)
        replay = {n: d * e + (1 - d) * raw[step][n].double() for n, e in replay.items()}
    exported, final = _exported(run), _ckpt(run, STEPS)
    assert final["ema_updates"] == STEPS
    assert exported.keys() == raw[STEPS].keys()
    for name, value in exported.items():
        if name in trainable:
            torch.testing.assert_close(value.double(), replay[name], rtol=1e-5, atol=1e-7)
            assert torch.equal(value, final["ema"][name]), name  # the checkpoint's own EMA
        else:  # frozen parameters and buffers: as trained
            assert torch.equal(value, raw[STEPS][name]), name
    # the EMA is not the raw weights (which the checkpoint keeps)
    assert not torch.equal(exported["visual.conv1.weight"], raw[STEPS]["visual.conv1.weight"])
    # the evaluation callback saw the EMA weights; training went on from the raw ones (each
    # step's checkpoint, written after its evaluation, holds both, and they differ)
    assert sorted(evaluated) == [2, 4]
    for step, weights in evaluated.items():
        ckpt = _ckpt(run, step)
        _assert_equal_state(weights, with_ema_weights(ckpt["model"], ckpt["ema"]))
        assert not torch.equal(ckpt["ema"]["text_projection"], ckpt["model"]["text_projection"])


def test_a_skipped_step_does_not_update_the_ema(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import clipforge.pretrain.train as train_module

    calls = []
    real = train_module.clip_grad_norm

    def norm_inf_at_step_3(model: nn.Module, max_norm: float) -> float:
        calls.append(None)
        norm = real(model, max_norm)
        return float("inf") if len(calls) == 3 else norm  # the step is then skipped

    monkeypatch.setattr(train_module, "clip_grad_norm", norm_inf_at_step_3)
    run = tmp_path / "run"
    train(_config(demo, run, "--set", "train.ema_decay=0.6"))
    ckpt = {s: _ckpt(run, s) for s in (2, 3, 4)}
    assert [ckpt[s]["nonfinite_steps"] for s in (2, 3, 4)] == [0, 1, 1]
    assert [ckpt[s]["ema_updates"] for s in (2, 3, 4)] == [2, 2, 3]
    _assert_equal_state(ckpt[2]["ema"], ckpt[3]["ema"])  # step 3 changed neither
    _assert_equal_state(ckpt[2]["model"], ckpt[3]["model"])


@pytest.mark.parametrize("form", ["whole", "sharded"])
def test_crash_resume_with_ema_equals_an_unbroken_run(
    demo: Path, tmp_path: Path, form: str
) -> None:
    extra = ["--set", "train.ema_decay=0.7"] + (["--set", SHARDED] if form == "sharded" else [])
    straight = tmp_path / "straight"
    train(_config(demo, straight, *extra))
    resumed = cut_back(straight, tmp_path / "resumed", 2)
    train(_config(demo, resumed, *extra))
    for step in (3, STEPS):
        a, b = _ckpt(straight, step), _ckpt(resumed, step)
        assert a["ema_updates"] == b["ema_updates"] == step
        _assert_equal_state(a["ema"], b["ema"])
        _assert_equal_state(a["model"], b["model"])
    _assert_equal_state(_exported(straight), _exported(resumed))
    assert not torch.equal(a["ema"]["text_projection"], a["model"]["text_projection"])
    # a re-run of the finished run exports model/ again only when it is not the EMA weights
    exported = _exported(resumed)
    written = (resumed / "model" / OPEN_CLIP_WEIGHTS_NAME).stat().st_mtime_ns
    assert train(_config(demo, resumed, *extra)).already_complete
    assert (resumed / "model" / OPEN_CLIP_WEIGHTS_NAME).stat().st_mtime_ns == written
    shutil.rmtree(resumed / "model")
    assert train(_config(demo, resumed, *extra)).already_complete
    _assert_equal_state(_exported(resumed), exported)
    # re-run without the EMA flag: the run's export is still its EMA, not replaced by raw weights
    plain = [x for x in extra if "ema_decay" not in x and x != "--set"]
    plain = [y for x in plain for y in ("--set", x)]
    assert train(_config(demo, resumed, *plain)).already_complete
    assert (resumed / "model" / OPEN_CLIP_WEIGHTS_NAME).exists()
    _assert_equal_state(_exported(resumed), exported)


def test_turning_ema_on_or_off_on_resume(
    demo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clipforge.pretrain.train")
    plain = tmp_path / "plain"
    train(_config(demo, plain))
    assert "ema" not in _ckpt(plain, STEPS) and "ema_updates" not in _ckpt(plain, STEPS)

    # on, from a checkpoint without one: the EMA starts at step 2's weights
    decay = 0.5
    on = cut_back(plain, tmp_path / "on", 2)
    train(_config(demo, on, "--set", f"train.ema_decay={decay}", "--set", "train.ema_warmup=false"))
    assert "holds no EMA of the weights: the EMA (train.ema_decay=0.5) starts" in caplog.text
    raw = {s: _ckpt(on, s)["model"] for s in (2, 3, 4)}
    final = _ckpt(on, STEPS)
    assert final["ema_updates"] == 2
    for name, value in final["ema"].items():
        expected = decay * (decay * raw[2][name] + (1 - decay) * raw[3][name])
        torch.testing.assert_close(value, expected + (1 - decay) * raw[4][name])
        assert torch.equal(_exported(on)[name], value)

    # off, from a checkpoint with one: ignored, model/ holds the raw weights
    caplog.clear()
    off = cut_back(on, tmp_path / "off", 3)
    train(_config(demo, off))
    assert "holds an EMA of the weights: ignored (train.ema_decay=0)" in caplog.text
    assert "ema" not in _ckpt(off, STEPS)
    _assert_equal_state(_exported(off), _ckpt(off, STEPS)["model"])


def test_fsdp_two_ranks_sharded_ema_exports_and_resumes_on_one_process(
    demo: Path, tmp_path: Path
) -> None:
    args = ("--set", "model.fsdp=true", "--set", "train.ema_decay=0.7", "--set", SHARDED)
    run = tmp_path / "run"
    torchrun_two_ranks(tiny_run_args(demo, run, 16, STEPS, 2, *args))
    # each rank saved its shards of the EMA; model/ holds the EMA gathered from the live
    # shards (the same gather a whole-state checkpoint's EMA takes): they are one and the same
    final = _ckpt(run, STEPS)
    assert final["ema_updates"] == STEPS
    _assert_equal_state(_exported(run), with_ema_weights(final["model"], final["ema"]))
    assert not torch.equal(final["ema"]["text_projection"], final["model"]["text_projection"])
    # FSDP 2 ranks -> 1 process: DCP reshards step 2's EMA, which goes on from there (on
    # other batches: the data streams are re-split), as replayed from the raw weights
    cut = cut_back(run, tmp_path / "then-1", 2)
    train(load_config("tiny", tiny_run_args(demo, cut, 16, STEPS, 1, *args)[3::2]))
    ema, raw = _ckpt(run, 2)["ema"], {s: _ckpt(cut, s)["model"] for s in (3, 4)}
    for n in (2, 3):  # the EMA updates before steps 3 and 4: d = min(0.7, (1 + n) / (10 + n))
        d = min(0.7, (1 + n) / (10 + n))
        ema = {k: d * v.double() + (1 - d) * raw[n + 1][k].double() for k, v in ema.items()}
    resumed = _ckpt(cut, STEPS)
    assert resumed["ema_updates"] == STEPS
    for name, value in resumed["ema"].items():
        torch.testing.assert_close(value.double(), ema[name], rtol=1e-5, atol=1e-7)
