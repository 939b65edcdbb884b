"""Mixed precision on the CPU: bf16 (and fp16) autocast against float32 from the same weights and
batch, the pooled-only forward under autocast against open_clip's own forward under autocast, and
FSDP2 with a bf16 ``MixedPrecisionPolicy`` on 2 gloo ranks against DDP under the same autocast.

Low precision is not exact, so these tests compare against float32 with stated tolerances, and
against the size of the bf16 error itself where "the same as" is the claim (a code path that is
equal under autocast differs from its twin by no more than autocast's own rounding).

Tolerances (clipforge-tiny, the demo batch of 32; measured on the 2-core CPU machine in
brackets):

* training step, bf16 / fp16 vs fp32 through ``clipforge-pretrain``: |loss difference| <= 2 % of
  the loss [bf16 3.8622 vs 3.8584: 0.10 %; fp16 (CPU autocast + GradScaler) 3.8580: 0.011 %];
* the gradients of that step (the trainer's model, loss, autocast and scaler): cosine of the
  whole gradient vector >= 0.99 [bf16 0.99983, fp16 1.00000]; every parameter tensor's cosine
  >= 0.9 [bf16 worst 0.9993]; global norm within 5 % [bf16 1.0 %, fp16 0.2 %];
* pooled-only forward vs open_clip's forward, both under bf16 autocast: features and gradients
  differ by at most 2x (+ a floor of 1e-3 of the scale) the bf16-vs-fp32 difference of
  open_clip's own forward, feature cosine >= 0.999 [the features are bitwise equal: 0 vs a
  bf16 rounding of 2.9e-2 (text) and 1.6e-2 (image)];
* FSDP2 + bf16 MixedPrecisionPolicy vs DDP, both under bf16 autocast, 2 gloo ranks: loss within
  1 % [2.83805 vs 2.83836, 2.30578 vs 2.30440], whole-gradient cosine >= 0.99 [0.99985]; inside
  the forward the FSDP blocks' weights are bfloat16 (gloo all-gathers bf16: it does, as it
  all-reduces and reduce-scatters bf16 in torch 2.14) and the sharded gradients are float32
  (reduce-scattered in float32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import VisionTransformer

from clipforge.pretrain.cli import main
from clipforge.pretrain.config import ModelConfig, load_config
from clipforge.pretrain.distributed import init_distributed
from clipforge.pretrain.models import build_model
from clipforge.pretrain.step import forward_backward
from clipforge.pretrain.train import Trainer
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[2]

STEP_ARGS = (
    "--config", "tiny", "--set", "train.steps=1", "--set", "train.log_every=1",
    "--set", "train.progress=lines", "--set", "data.workers=0", "--set", "optim.warmup_steps=0",
    "--set", "train.device=cpu",  # CPU autocast, on a GPU machine too
)  # fmt: skip


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def _step_loss(demo: Path, run: Path, precision: str) -> float:
    argv = [*STEP_ARGS, "--set", f"data.train={demo}", "--set", f"train.run_dir={run}"]
    assert main([*argv, "--set", f"train.precision={precision}"]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return float(record["loss"])


def _trainer_step(demo: Path, run: Path, precision: str) -> dict:
    """The first step's batch, loss and float32 gradients, through the trainer's own model, loss,
    autocast and scaler (as ``Trainer.train`` runs them)."""
    overrides = [a for a in STEP_ARGS[2:] if a != "--set"]
    config = load_config(
        "tiny",
        [*overrides, f"data.train={demo}", f"train.run_dir={run}", f"train.precision={precision}"],
    )
    trainer = Trainer(config, init_distributed("cpu"))
    batch = next(iter(trainer.loader))
    out = forward_backward(
        trainer.model,
        batch["image"],
        batch["text"],
        trainer.loss_fn,
        autocast=trainer.autocast,
        grad_scaler=trainer.scaler,
    )
    scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0
    grads = {n: q.grad / scale for n, q in trainer.model.named_parameters() if q.grad is not None}
    assert all(g.dtype == torch.float32 for g in grads.values())  # master weights stay float32
    return {"image": batch["image"], "loss": float(out["loss"]), "grads": grads}


@pytest.fixture(scope="module")
def fp32_step(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("fp32")
    step = _trainer_step(demo, tmp / "trainer", "fp32")
    step["main_loss"] = _step_loss(demo, tmp / "main", "fp32")
    assert step["loss"] == pytest.approx(step["main_loss"], rel=1e-6)  # what main() logged
    return step


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_step_in_low_precision_matches_fp32(
    demo: Path, tmp_path: Path, precision: str, fp32_step: dict
) -> None:
    fp32 = fp32_step["main_loss"]
    low = _step_loss(demo, tmp_path / "main", precision)
    print(f"\nstep-1 loss through main(): fp32 {fp32:.5f} {precision} {low:.5f}")
    assert low == pytest.approx(fp32, rel=0.02)
    assert low != fp32  # autocast really ran: some rounding differs

    step = _trainer_step(demo, tmp_path / "trainer", precision)
    assert torch.equal(step["image"], fp32_step["image"])  # same seed, same first batch
    assert step["loss"] == pytest.approx(low, rel=1e-6)
    grads, ref = step["grads"], fp32_step["grads"]
    assert grads.keys() == ref.keys()
    flat = lambda gs: torch.cat([gs[n].flatten() for n in ref])  # noqa: E731
    whole = _cosine(flat(grads), flat(ref))
    per_param = {
        n: _cosine(g, ref[n])
        for n, g in grads.items()
        if ref[n].norm() > 1e-6  # the cosine of a ~zero gradient is noise
    }
    worst = min(per_param, key=per_param.get)
    norm, ref_norm = float(flat(grads).norm()), float(flat(ref).norm())
    print(
        f"{precision}: gradient cosine {whole:.5f}, worst tensor {worst} "
        f"{per_param[worst]:.4f}; norm {norm:.4f} vs {ref_norm:.4f}"
    )
    assert whole >= 0.99
    assert per_param[worst] >= 0.9, worst
    assert norm == pytest.approx(ref_norm, rel=0.05)


def _features_and_grads(model: torch.nn.Module, encode, inputs: torch.Tensor, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        features = encode(inputs)  # (B, D)
    weights = torch.linspace(-1, 1, features.numel()).view_as(features)
    (features.float() * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return features.detach().float(), grads


def _assert_equal_under_autocast(model, encode, reference, inputs: torch.Tensor) -> None:
    """``encode`` under bf16 autocast is as close to ``reference`` under bf16 autocast as bf16
    autocast is to float32 (twice that, plus a floor of 1e-3 of the values' scale)."""
    feats, grads = _features_and_grads(model, encode, inputs, autocast=True)
    ref, ref_grads = _features_and_grads(model, reference, inputs, autocast=True)
    exact, exact_grads = _features_and_grads(model, reference, inputs, autocast=False)
    rounding = (ref - exact).abs().max()
    assert rounding > 0  # autocast really ran in bf16
    gap = (feats - ref).abs().max()
    print(f"\nfeatures: pooled vs full (bf16) {gap:.2e}; full bf16 vs fp32 {rounding:.2e}")
    assert gap <= 2 * rounding + 1e-3 * exact.abs().max()
    assert _cosine(feats, ref) >= 0.999
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        bound = 2 * (ref_grads[name] - exact_grads[name]).abs().max()
        assert (g - ref_grads[name]).abs().max() <= bound + 1e-3 * exact_grads[name].abs().max()


def test_pooled_forward_under_autocast_equals_open_clip_under_autocast() -> None:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="clipforge-tiny"))
    model.train()
    captions = [" ".join(["happy"] * (i % 30)) + " face" for i in range(40)]
    text = open_clip.get_tokenizer("clipforge-tiny")(captions)  # (40, 32): several length groups
    _assert_equal_under_autocast(
        model, model.encode_text, lambda t: open_clip.CLIP.encode_text(model, t), text
    )
    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _assert_equal_under_autocast(
        model, model.encode_image, lambda x: VisionTransformer.forward(model.visual, x), images
    )


# ----------------------------------------------------------------------------- FSDP2 vs DDP


def _rank_run(rank: int, world: int, port: int, out_dir: str) -> None:
    """One gloo rank: DDP, then FSDP2 with a bf16 MixedPrecisionPolicy, both under bf16
    autocast, on this rank's half of the same batch from the same weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from open_clip.transformer import ResidualAttentionBlock
    from torch.nn.parallel import DistributedDataParallel

    from clipforge.pretrain.distributed import DistInfo
    from clipforge.pretrain.losses import make_loss
    from clipforge.pretrain.parallelize import parallelize
    from tests.test_pretrain.oracle_data import batch, tiny_model

    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    images, texts = batch()
    images = images.float()
    rows = slice(rank * len(images) // world, (rank + 1) * len(images) // world)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    results = {}
    for wrap in ("ddp", "fsdp"):
        plain = tiny_model("infonce").float()
        seen_dtypes: list[torch.dtype] = []
        if wrap == "ddp":
            model, inner = DistributedDataParallel(plain), plain
        else:
            info = DistInfo(rank, world, rank, torch.device("cpu"), "gloo")
            model = parallelize(plain, ModelConfig(fsdp=True), info, param_dtype=torch.bfloat16)
            inner = model
            block = next(m for m in model.modules() if isinstance(m, ResidualAttentionBlock))
            block.mlp.c_fc.register_forward_pre_hook(
                lambda m, args, seen=seen_dtypes: seen.append(m.weight.dtype)
            )
        out = forward_backward(
            model, images[rows], texts[rows], make_loss("infonce"), autocast=autocast
        )
        grads, grad_dtypes = {}, set()
        for n, p in inner.named_parameters():
            if p.grad is not None:
                grad_dtypes.add(str(p.grad.dtype))
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[n] = g.float()
        results[wrap] = {
            "loss": float(out["loss"]),
            "grads": grads,
            "grad_dtypes": sorted(grad_dtypes),
            "forward_weight_dtypes": [str(d) for d in seen_dtypes],
        }
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_fsdp2_bf16_policy_equals_ddp_under_autocast(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tests.test_pretrain.test_bf16", "2", str(port), str(tmp_path)]
    procs = [
        subprocess.Popen(
            [*cmd[:3], str(rank), *cmd[3:]], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
        )
        for rank in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        ddp, fsdp = r["ddp"], r["fsdp"]
        # the policy is live: blocks computed with bf16 weights, gradients reduced in float32
        assert fsdp["forward_weight_dtypes"] and set(fsdp["forward_weight_dtypes"]) == {
            "torch.bfloat16"
        }
        assert fsdp["grad_dtypes"] == ["torch.float32"]
        assert fsdp["loss"] == pytest.approx(ddp["loss"], rel=0.01)
        assert fsdp["grads"].keys() == ddp["grads"].keys()
        whole = _cosine(
            torch.cat([g.flatten() for g in fsdp["grads"].values()]),
            torch.cat([ddp["grads"][n].flatten() for n in fsdp["grads"]]),
        )
        print(f"\nloss ddp {ddp['loss']:.5f} fsdp-bf16 {fsdp['loss']:.5f}; grad cosine {whole:.5f}")
        assert whole >= 0.99
    # both ranks hold the same (averaged) gradient
    for n, g in ranks[0]["fsdp"]["grads"].items():
        torch.testing.assert_close(g, ranks[1]["fsdp"]["grads"][n], rtol=0, atol=0)


if __name__ == "__main__":
    _rank_run(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
