"""Every CUDA path against its CPU counterpart: the training step (fp32 and bf16), the trainer
on CUDA through ``clipforge-pretrain`` (MFU reported), NCCL with DDP and FSDP2 (bf16 policy),
``torch.compile``, embedding, evaluation (tie-exact ranks) and search, faiss-gpu. All marked
``gpu``: skipped without CUDA (tests/test_gpu/conftest.py), run by benchmarks/gpu_check.sh.

Tolerances: CUDA fp32 vs CPU fp32 (TF32 off): loss rel 1e-4, gradients within 1e-3 of their
scale; CUDA bf16 vs CPU fp32: loss rel 2 %, whole-gradient cosine >= 0.99 (as the CPU bf16 tests
in tests/test_pretrain/test_bf16.py); embeddings GPU (bf16 autocast) vs CPU fp32: row cosine
>= 0.99; eval ranks: GPU == CPU exactly (float64 accumulation); clipforge-eval R@K on the GPU
within 3 queries of the CPU's in fp32, 2 points in bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clipforge.eval.metrics import blocked_ranks
from clipforge.pretrain.cli import main as pretrain_main
from clipforge.pretrain.losses import make_loss
from clipforge.pretrain.step import forward_backward
from tests.ports import free_port
from tests.test_eval.dist_worker import random_case
from tests.test_pretrain.oracle_data import batch, tiny_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_tf32() -> None:
    """fp32 on CUDA means fp32 here: TF32 matmuls would be a 1e-3 difference of their own."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _step(device: str, precision: str) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model("infonce").float().to(device)
    images, texts = batch()
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    autocast = lambda: torch.autocast(device, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    out = forward_backward(
        model, images.float().to(device), texts.to(device), make_loss("infonce"), autocast=autocast
    )
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return float(out["loss"]), grads


def test_cuda_training_step_matches_cpu_fp32() -> None:
    cpu_loss, cpu_grads = _step("cpu", "fp32")
    loss, grads = _step("cuda", "fp32")
    assert loss == pytest.approx(cpu_loss, rel=1e-4)
    for n, g in grads.items():
        ref = cpu_grads[n]
        assert (g - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-6, n
    loss, grads = _step("cuda", "bf16")
    assert loss == pytest.approx(cpu_loss, rel=0.02)
    flat = lambda gs: torch.cat([gs[n].flatten() for n in cpu_grads])  # noqa: E731
    assert _cosine(flat(grads), flat(cpu_grads)) >= 0.99


def _train(demo: Path, run: Path, *sets: str) -> list[dict]:
    argv = [
        "--config", "tiny", "--set", f"data.train={demo}", "--set", f"train.run_dir={run}",
        "--set", "train.steps=4", "--set", "train.log_every=1", "--set", "train.progress=lines",
        "--set", "optim.warmup_steps=0", "--set", "data.workers=2",
    ]  # fmt: skip
    for s in sets:
        argv += ["--set", s]
    assert pretrain_main(argv) == 0
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_trainer_on_cuda_in_bf16_reports_mfu_and_matches_cpu(demo: Path, tmp_path: Path) -> None:
    from clipforge.pretrain.throughput import PEAK_BF16_FLOPS

    cpu = _train(demo, tmp_path / "cpu", "train.device=cpu", "train.precision=fp32")
    gpu = _train(demo, tmp_path / "gpu", "train.device=cuda", "train.precision=bf16")
    # same init and first batch: the first loss agrees to bf16 rounding
    assert gpu[0]["loss"] == pytest.approx(cpu[0]["loss"], rel=0.02)
    assert gpu[-1]["loss"] < gpu[0]["loss"] + 0.5  # trains, no blow-up
    assert all(r["nonfinite_steps"] == 0 for r in gpu)
    assert gpu[-1]["tflops_per_device"] > 0
    name = torch.cuda.get_device_name()
    if any(k in name for k in PEAK_BF16_FLOPS):
        assert 0 < gpu[-1]["mfu"] < 1
    else:
        assert "mfu" not in gpu[-1], f"{name} is not in the peak table"
    # exported weights load on the CPU
    from clipforge.pretrain.models import load_model

    loaded = load_model(tmp_path / "gpu")
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_compile_on_cuda_matches_eager(demo: Path, tmp_path: Path) -> None:
    eager = _train(demo, tmp_path / "eager", "train.device=cuda")
    compiled = _train(demo, tmp_path / "compiled", "train.device=cuda", "model.compile=true")
    for a, b in zip(eager, compiled, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3), a["step"]


def _torchrun(nproc: int, out: Path) -> list[dict]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), "-m", "tests.test_gpu.nccl_worker", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(nproc)]


@pytest.mark.parametrize("nproc", [1, 2])
def test_nccl_ddp_and_fsdp2_bf16(nproc: int, tmp_path: Path) -> None:
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs, {torch.cuda.device_count()} visible")
    ranks = _torchrun(nproc, tmp_path)
    cpu_loss, cpu_grads = _step("cpu", "fp32")  # the whole batch in one CPU process
    for r in ranks:
        assert r["world"] == nproc
        assert r["max"] == nproc - 1 and r["mean"] == pytest.approx((nproc - 1) / 2)
        for wrap in ("ddp", "fsdp"):
            w = r[wrap]
            assert w["weights_on_cpu"]
            assert w["grads"].keys() == cpu_grads.keys()
            flat = torch.cat([w["grads"][n].flatten() for n in cpu_grads])
            ref = torch.cat([g.flatten() for g in cpu_grads.values()])
            assert _cosine(flat, ref) >= 0.99, wrap
        assert r["fsdp"]["loss"] == pytest.approx(r["ddp"]["loss"], rel=0.01)
    mean_loss = sum(r["ddp"]["loss"] for r in ranks) / nproc
    assert mean_loss == pytest.approx(cpu_loss, rel=0.02)


def test_two_gpu_training_through_torchrun(demo: Path, tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-port", str(free_port()), "-m", "clipforge.pretrain", "--config", "tiny",
        "--set", f"data.train={demo}", "--set", f"train.run_dir={tmp_path}", "--set",
        "train.steps=4", "--set", "train.log_every=1", "--set", "train.precision=bf16",
        "--set", "train.device=cuda", "--set", "train.progress=lines",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["samples_seen"] == 4 * 32 * 2


def test_eval_ranks_on_gpu_equal_cpu_exactly() -> None:
    q, c, qg, cg = random_case()  # duplicated candidates: exact ties
    cpu = blocked_ranks(q, c, qg, cg, query_block=16, cand_block=50, device="cpu")
    gpu = blocked_ranks(q, c, qg, cg, query_block=64, cand_block=128, device="cuda")
    for key in ("index", "optimistic", "pessimistic"):
        assert torch.equal(getattr(gpu, key).cpu(), getattr(cpu, key)), key
    assert cpu.tied_queries > 0


def _embed(model_dir: Path, demo: Path, out: Path, device: str) -> Path:
    from clipforge.index.cli import main as index_main

    argv = ["embed", "--model", str(model_dir), "--data", str(demo), "--out", str(out)]
    argv += ["--dtype", "float32", "--workers", "2", "--progress", "none", "--device", device]
    assert index_main(argv) == 0
    return out


def test_embed_search_and_eval_on_gpu_match_cpu(
    trained_demo_run: Path, demo: Path, tmp_path: Path
) -> None:
    """On the session's demo-trained model (on a GPU machine it trains there, in seconds): a
    model that has learned, so that float rounding does not reorder near-equal scores."""
    import pyarrow.parquet as pq

    from clipforge.eval.cli import main as eval_main
    from clipforge.index.cli import main as index_main
    from clipforge.index.searcher import Searcher

    cpu = _embed(trained_demo_run, demo, tmp_path / "cpu", "cpu")
    gpu = _embed(trained_demo_run, demo, tmp_path / "gpu", "cuda")
    for sub, stem in (("img_emb", "img_emb"), ("text_emb", "text_emb")):
        for part in sorted((cpu / sub).glob("*.npy")):
            a, b = np.load(part), np.load(gpu / sub / part.name)
            assert a.shape == b.shape
            cos = (a.astype(np.float64) * b).sum(1) / (
                np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
            )
            assert cos.min() >= 0.99, (stem, part.name, cos.min())
    for part in sorted((cpu / "metadata").glob("*.parquet")):  # same rows, keys and offsets
        assert pq.read_table(part).equals(pq.read_table(gpu / "metadata" / part.name))

    # search: a GPU query model over the (CPU-built) index finds what the CPU one finds
    index = tmp_path / "index"
    argv = ["build", "--embeddings", str(cpu), "--out", str(index), "--kind", "flat", "--cpu"]
    assert index_main(argv) == 0
    on_cpu = Searcher.open(index, device="cpu").search_text(["red heart", "cat face"], k=5)
    on_gpu = Searcher.open(index, device="cuda").search_text(["red heart", "cat face"], k=5)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert a[0].id == b[0].id or abs(a[0].score - b[0].score) < 1e-3
        assert [h.score for h in b] == pytest.approx([h.score for h in a], abs=1e-2)

    # clipforge-eval on the GPU (fp32 and bf16) vs the CPU
    figures = {}
    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16")):
        out = tmp_path / f"eval-{device}-{precision}.json"
        argv = ["retrieval", "--model", str(trained_demo_run), "--data", str(demo)]
        argv += ["--device", device, "--precision", precision, "--json", str(out)]
        assert eval_main(argv) == 0
        figures[device, precision] = json.loads(out.read_text())["metrics"]["exact"]
    for d in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10):
            ref = figures["cpu", "fp32"][d][f"R@{k}"]
            assert abs(figures["cuda", "fp32"][d][f"R@{k}"] - ref) <= 3 / 1911, (d, k)
            assert abs(figures["cuda", "bf16"][d][f"R@{k}"] - ref) <= 0.02, (d, k)


def test_faiss_gpu_build_and_search_match_cpu(tmp_path: Path) -> None:
    import faiss

    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("this faiss has no GPU support (faiss-cpu, or no GPU visible to faiss)")
    from clipforge.index.cli import main as index_main
    from clipforge.index.searcher import Searcher
    from tests.test_index.synthetic import write_synthetic_embeddings

    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(15000, 10000), dim=64)
    for where in ("gpu", "cpu"):
        argv = ["build", "--embeddings", str(emb), "--out", str(tmp_path / where)]
        assert index_main([*argv, "--kind", "flat", f"--{where}"]) == 0
        manifest = json.loads((tmp_path / where / "index.json").read_text())
        assert manifest["modalities"]["image"]["device"].startswith(where), manifest
    queries = np.load(sorted((emb / "text_emb").glob("*.npy"))[0])[:200].astype(np.float32)
    hits = {w: Searcher.open(tmp_path / w).search_embeddings(queries, k=10) for w in ("gpu", "cpu")}
    pairs = zip(hits["gpu"], hits["cpu"], strict=True)
    same = sum([h.id for h in a] == [h.id for h in b] for a, b in pairs)
    assert same >= 195  # flat: exact on both (a few order swaps among float ties at most)
    # an IVF index trained on the GPU reaches its recall target as on the CPU
    argv = ["build", "--embeddings", str(emb), "--out", str(tmp_path / "ivf"), "--gpu"]
    assert index_main([*argv, "--kind", "ivf_flat", "--target-recall", "0.9"]) == 0
    ivf = json.loads((tmp_path / "ivf" / "index.json").read_text())["modalities"]["image"]
    assert ivf["measured_recall_at_10"] >= 0.9
