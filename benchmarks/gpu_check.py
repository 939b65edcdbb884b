"""The one-call GPU check: every CUDA path of clipforge, settled in one run of a few minutes.

``benchmarks/gpu_check.sh`` installs clipforge on a fresh GPU machine and runs this; on its own:

    python benchmarks/gpu_check.py [--out runs/gpu-check/gpu_check.json] [--budget-s 420]
    python benchmarks/gpu_check.py --dry-run      # CPU, tiny sizes: the CUDA parts are skipped

Stages, in order of value, each timed, each in its own try/except (an error is recorded in the
JSON and the next stage runs), all under one time budget (a stage that would start with too
little time left is skipped and says so):

1. ``pytest -m gpu`` (tests/test_gpu: CUDA vs CPU, NCCL, FSDP2, compile, embed/eval/search,
   faiss-gpu, the no-silent-fallback refusals);
2. training throughput of ViT-B/32 and ViT-B/16 in bf16 on synthetic tensors (the model
   ceiling): clipforge with the pooled-only forward on and off, and open_clip's own
   ``create_model`` + ``ClipLoss`` step on the same batch, eager;
3. the same models end to end through ``clipforge-pretrain`` on generated 256-px JPEG shards
   read by the real reader with N workers (samples/s/GPU, TFLOP/s, MFU, data-wait);
4. ``clipforge-index embed`` of 100k generated samples on the GPU, then ``clipforge-eval``'s
   exact blocked similarity over them on the GPU (and GPU == CPU on a slice);
5. FAISS build of those embeddings (GPU when faiss sees one, else CPU, with the reason);
6. training with ``model.compile`` on (costly to compile: after the cheap figures);
7. the CPU suite's fast subset.

Every figure goes to the JSON (rewritten after each stage, atomically, so a killed run keeps
what it measured) and a one-screen summary is printed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The CPU suite's fast subset for a 16-core GPU machine (< 2 min there; unit-level files, no
# 400-step training fixture): the math that the GPU figures rest on.
CPU_SUBSET = (
    "tests/test_pretrain/test_losses.py",
    "tests/test_pretrain/test_step.py",
    "tests/test_pretrain/test_pooled_forward.py",
    "tests/test_pretrain/test_config.py",
    "tests/test_pretrain/test_bf16.py",
    "tests/test_eval/test_metrics.py",
    "tests/test_index/test_build.py",
    "tests/test_index/test_store.py",
    "tests/test_data_tools/test_reader.py",
    "tests/test_gpu/test_refusals.py",
)
DRY_CPU_SUBSET = ("tests/test_pretrain/test_config.py",)


STAGE_NAMES = (
    "environment", "pytest_gpu", "train_synthetic", "train_e2e", "embed_eval", "faiss",
    "train_compile", "pytest_cpu_subset",
)  # fmt: skip


class StageTimeout(Exception):
    """A stage ran past its share of the budget."""


@dataclass(frozen=True)
class Sizes:
    """How big everything is: the real run on a GPU, or the dry run on a CPU."""

    models: tuple[str, ...]
    batch: int
    steps: int
    warmup: int
    e2e_steps: int
    e2e_images: int
    embed_samples: int
    embed_batch: int
    workers: int
    distinct: int
    stage_s: dict[str, float]


def real_sizes(workers: int) -> Sizes:
    return Sizes(
        models=("ViT-B-32", "ViT-B-16"),
        batch=256,
        steps=12,
        warmup=4,
        e2e_steps=30,
        e2e_images=4000,
        embed_samples=100_000,
        embed_batch=1024,
        workers=workers,
        distinct=2000,
        stage_s={
            "environment": 60,
            "pytest_gpu": 150,
            "train_synthetic": 90,
            "train_e2e": 100,
            "embed_eval": 90,
            "faiss": 30,
            "train_compile": 150,
            "pytest_cpu_subset": 120,
        },
    )


def dry_sizes() -> Sizes:
    return Sizes(
        models=("clipforge-tiny",),
        batch=8,
        steps=2,
        warmup=1,
        e2e_steps=2,
        e2e_images=64,
        embed_samples=192,
        embed_batch=64,
        workers=1,
        distinct=48,
        # generous: the dry run proves the code paths, on a CPU that may be busy
        stage_s=dict.fromkeys(STAGE_NAMES, 300.0),
    )


# ----------------------------------------------------------------------------- the harness


class Check:
    """Runs stages under one wall-clock budget and keeps the JSON up to date."""

    def __init__(self, out: Path, budget_s: float, dry_run: bool) -> None:
        self.out, self.budget_s, self.dry_run = out, budget_s, dry_run
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {
            "format": "clipforge.gpu_check/v1",
            "dry_run": dry_run,
            "budget_s": budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "stages": {},
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def stage(self, name: str, fn: Callable[[], dict[str, Any]], max_s: float, min_s: float = 5):
        """Run ``fn`` for at most ``max_s`` (and what the budget has left); record its result,
        or its error, or why it was skipped."""
        allowed = min(max_s, self.left())
        record: dict[str, Any]
        if allowed < min_s:
            record = {"status": "skipped", "reason": f"budget: {self.left():.0f} s left"}
        else:
            print(f"[{self.elapsed():6.1f} s] {name} (up to {allowed:.0f} s)", flush=True)
            start = time.perf_counter()
            try:
                with _alarm(allowed):
                    record = {"status": "ok", **fn()}
            except StageTimeout:
                record = {"status": "timeout", "error": f"stopped after {allowed:.0f} s"}
            except Exception as e:  # every stage is independent: record and go on
                # a library that catches everything may turn the alarm into its own error
                late = time.perf_counter() - start >= allowed - 0.5
                record = {
                    "status": "timeout" if late else "error",
                    "error": f"{type(e).__name__}: {e}"[:2000],
                    "traceback": traceback.format_exc()[-4000:],
                }
            record["seconds"] = round(time.perf_counter() - start, 2)
        self.results["stages"][name] = record
        print(f"[{self.elapsed():6.1f} s] {name}: {record['status']}", flush=True)
        self.save()
        return record

    def save(self) -> None:
        from clipforge.data_tools.atomic import write_json_atomic

        self.results["elapsed_s"] = round(self.elapsed(), 2)
        write_json_atomic(self.out, self.results)


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise StageTimeout in the main thread after ``seconds`` (Python code only: a stage stuck
    inside one long C call is stopped when it returns, or by gpu_check.sh's outer timeout)."""

    def fire(signum: int, frame: Any) -> None:
        raise StageTimeout

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- environment


def environment(device: Any) -> dict[str, Any]:
    import torch

    from clipforge.pretrain.throughput import PEAK_BF16_FLOPS

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_name=props.name,
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            capability=f"{props.major}.{props.minor}",
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        env["peak_bf16_tflops"] = next(
            (v / 1e12 for k, v in PEAK_BF16_FLOPS.items() if k in props.name), None
        )
    for mod in ("open_clip", "faiss", "webdataset", "pyarrow", "numpy"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            env[mod] = f"missing ({type(e).__name__})"
    try:
        import faiss

        env["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except Exception:
        env["faiss_gpus"] = None
    return env


def peak_flops(device: Any) -> float | None:
    """The GPU's dense bf16 peak from the trainer's public table (None: CPU or unknown GPU)."""
    import torch

    from clipforge.pretrain.throughput import PEAK_BF16_FLOPS

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- pytest


def run_pytest(
    args: Sequence[str], timeout_s: float, work: Path, name: str, hide_gpu: bool = False
) -> dict[str, Any]:
    """Run pytest in a child process; counts and failures from its JUnit XML. ``hide_gpu``: the
    child sees no CUDA device (the dry run is a CPU run, on a GPU machine too)."""
    xml = work / f"{name}.xml"
    xml.unlink(missing_ok=True)  # an earlier run's report must not stand for this one
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += list(args)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout_s - 2, 1)
        )
        rc: int | str = proc.returncode
        tail = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:  # its output so far is bytes, whatever text= says
        rc = "timeout"
        tail = b"".join(x for x in (e.stdout, e.stderr) if isinstance(x, bytes)).decode(
            errors="replace"
        )
    out: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": rc,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        assert suite is not None
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = (
            counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        )
        out.update(counts)
        problems, skips = [], {}
        for case in suite.iter("testcase"):
            test = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    problems.append({"test": test, tag: (el.get("message") or "")[:500]})
            el = case.find("skipped")
            if el is not None:
                skips[test] = (el.get("message") or "")[:200]
        out["failed_tests"] = problems
        out["skipped_tests"] = skips
    else:  # killed before pytest wrote its XML: the verbose lines of the tests that finished
        seen = re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", tail, re.MULTILINE)
        out["finished_tests"] = {test: outcome for test, outcome in seen}
    if rc != 0:
        out["output_tail"] = tail[-3000:]
    return out


# ----------------------------------------------------------------------------- synthetic training


def _caption_tokens(batch: int, context: int, seed: int = 0) -> Any:
    """(B, context) token rows shaped like web captions: SOT, 4..40 word tokens, EOT, padding
    (mean ~22 positions: what the pooled-only forward trims to)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, context, dtype=torch.long)
    lengths = torch.randint(4, min(41, context - 1), (batch,), generator=g)
    for row, n in enumerate(lengths.tolist()):
        tokens[row, 0] = 49406
        tokens[row, 1 : n + 1] = torch.randint(1, 49000, (n,), generator=g)
        tokens[row, n + 1] = 49407
    return tokens


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_rate(
    model_name: str,
    tool: str,
    device: Any,
    batch: int,
    steps: int,
    warmup: int,
    pooled: bool = True,
    compile_model: bool = False,
) -> dict[str, Any]:
    """Samples/s of full bf16 training steps (forward, loss, backward, AdamW) on one fixed
    synthetic batch: clipforge's model + step, or open_clip's own model + ClipLoss."""
    import open_clip
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clipforge.pretrain.config import ModelConfig
    from clipforge.pretrain.distributed import DistInfo
    from clipforge.pretrain.losses import make_loss
    from clipforge.pretrain.models import build_model, resolve_model_config
    from clipforge.pretrain.parallelize import parallelize
    from clipforge.pretrain.step import forward_backward

    torch.manual_seed(0)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    if tool == "clipforge":
        cfg = ModelConfig(name=model_name, pooled_forward=pooled, compile=compile_model)
        plain, model_cfg = build_model(cfg)
        model = parallelize(plain, cfg, DistInfo(0, 1, 0, device, None))
        loss_fn = make_loss("infonce")

        def step(images: Any, texts: Any) -> Any:
            return forward_backward(model, images, texts, loss_fn, autocast=autocast)["loss"]
    else:
        name, model_cfg = resolve_model_config(model_name)  # registers clipforge's configs too
        plain = open_clip.create_model(name, device=device)
        model = torch.compile(plain) if compile_model else plain
        clip_loss = open_clip.ClipLoss()

        def step(images: Any, texts: Any) -> Any:
            with autocast():
                image_f, text_f, scale = model(images, texts)[:3]
                loss = clip_loss(image_f, text_f, scale)
            loss.backward()
            return loss.detach()

    plain.train()
    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-5, fused=device.type == "cuda")
    vision = model_cfg.get("vision_cfg", {}) if model_cfg else {}
    size = vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    context = (model_cfg.get("text_cfg", {}) if model_cfg else {}).get("context_length", 77)
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    images, texts = images.to(device), _caption_tokens(batch, context).to(device)

    def one() -> float:
        _sync(device)
        t = time.perf_counter()
        step(images, texts)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        return time.perf_counter() - t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = one()  # compile / cudnn autotune / allocator warm-up
    for _ in range(max(warmup - 1, 0)):
        one()
    times = [one() for _ in range(steps)]
    flops = None
    if not compile_model:  # FLOPs of exactly this step's work (eager: the counter sees every op)
        counter = FlopCounterMode(display=False)
        with counter:
            step(images, texts)
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    median = statistics.median(times)
    out = {
        "model": model_name,
        "tool": tool,
        "pooled_forward": pooled if tool == "clipforge" else None,
        "compile": compile_model,
        "batch": batch,
        "first_step_s": round(first, 3),
        "median_step_s": round(median, 5),
        "samples_per_s": round(batch / median, 1),
        "flops_per_sample": flops / batch if flops else None,
        "tflops": round(flops / median / 1e12, 2) if flops else None,
    }
    if device.type == "cuda":
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
    return out  # the model and optimizer go with this frame; the caller empties the cache


def _with_mfu(
    rows: list[dict[str, Any]], peak: float | None, reference: Sequence[dict[str, Any]] = ()
) -> None:
    """MFU of each row twice: of the work it did (its own FLOPs) and of open_clip's model FLOPs
    for the same model (the convention that makes tools comparable: work skipped is not
    counted as done). Compiled rows take the FLOPs of their eager twin (in ``reference``)."""
    known = [r for r in [*rows, *reference] if r.get("flops_per_sample")]
    model_flops = {r["model"]: r["flops_per_sample"] for r in known if r["tool"] == "open_clip"}
    for r in rows:
        if "samples_per_s" not in r:
            continue
        own = r.get("flops_per_sample") or next(
            (
                x["flops_per_sample"]
                for x in known
                if (x["model"], x["tool"], x.get("pooled_forward"))
                == (r["model"], r["tool"], r.get("pooled_forward"))
            ),
            None,
        )
        if own and r.get("tflops") is None:
            r["tflops"] = round(own * r["samples_per_s"] / 1e12, 2)
        if peak:
            if own:
                r["mfu"] = round(own * r["samples_per_s"] / peak, 4)
            if r["model"] in model_flops:
                r["mfu_model_flops"] = round(model_flops[r["model"]] * r["samples_per_s"] / peak, 4)


def train_matrix(
    sizes: Sizes,
    device: Any,
    variants: Sequence[tuple[str, bool, bool]],
    reference: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Each model x (tool, pooled, compile) variant; an error or OOM in one is recorded."""
    import torch

    rows: list[dict[str, Any]] = []
    for model_name in sizes.models:
        for tool, pooled, comp in variants:
            batch = sizes.batch
            row: dict[str, Any] = {"model": model_name, "tool": tool}
            for _attempt in range(3):  # halve the batch on out-of-memory
                try:
                    row = train_rate(
                        model_name, tool, device, batch, sizes.steps, sizes.warmup, pooled, comp
                    )
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    batch //= 2
                    row = {"model": model_name, "tool": tool, "error": f"OOM; retry at {batch}"}
                except StageTimeout:
                    raise
                except Exception as e:
                    row = {
                        "model": model_name,
                        "tool": tool,
                        "pooled_forward": pooled,
                        "compile": comp,
                        "error": f"{type(e).__name__}: {e}"[:1000],
                    }
                    break
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(f"    {json.dumps(row)}", flush=True)
    _with_mfu(rows, peak_flops(device), reference)
    return {"rows": rows}


# ----------------------------------------------------------------------------- generated shards


def make_shards(work: Path, samples: int, distinct: int, workers: int, name: str) -> Path:
    """``samples`` 256-px JPEG samples in shards, written by clipforge's writer from a CSV that
    cycles ``distinct`` upscaled demo emoji (so decoding costs what real photos of that size
    cost, without generating 100k files first)."""
    from benchmarks.data_throughput import BenchConfig, make_source
    from clipforge.data_tools.writer import WriteConfig, write_shards

    out = work / name
    if (out / "manifest.json").exists():
        return out
    src = make_source(BenchConfig(work_dir=work, images=distinct, source_size=256))
    files = sorted(src.rglob("*.jpg"))
    table = work / f"{name}.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption"])
        for i in range(samples):
            path = files[i % len(files)]
            w.writerow([str(path), path.with_suffix(".txt").read_text(encoding="utf-8")])
    config = WriteConfig(
        image_size=256,
        image_format="jpg",
        quality=90,
        shard_size=max(samples // max(4 * workers, 8), 16),
        workers=max(workers, 1),
        prefix=name,
        image_column="path",
        caption_column="caption",
    )
    write_shards(table, out, config, progress=False)
    return out


def train_e2e(sizes: Sizes, device: Any, work: Path, dry_run: bool) -> dict[str, Any]:
    """``clipforge-pretrain`` itself (reader with N workers, trainer, bf16) on generated shards;
    the figures are the trainer's own metrics.jsonl (median after the warm-up steps)."""
    from clipforge.pretrain.cli import main as pretrain_main

    t = time.perf_counter()
    shards = make_shards(work, sizes.e2e_images, sizes.distinct, sizes.workers, "e2e")
    gen_s = time.perf_counter() - t
    rows = []
    for model_name in sizes.models:
        run = work / f"run-{model_name}"
        preset = {"ViT-B-32": "vit-b-32", "ViT-B-16": "vit-b-16"}.get(model_name, "tiny")
        argv = [
            "--config", preset, "--set", f"data.train={shards}", "--set", f"train.run_dir={run}",
            "--set", f"data.batch_size={sizes.batch}", "--set", f"data.workers={sizes.workers}",
            "--set", f"train.steps={sizes.e2e_steps}", "--set", "train.log_every=1",
            "--set", "train.precision=bf16", "--set", "train.progress=lines",
            "--set", "train.resume=false", "--set", "optim.warmup_steps=0",
            "--set", f"train.checkpoint_every={10**6}", "--set", "data.shuffle_buffer=500",
            "--set", f"train.device={'cpu' if dry_run else 'cuda'}",
        ]  # fmt: skip
        t = time.perf_counter()
        rc = pretrain_main(argv)
        wall = time.perf_counter() - t
        if rc != 0:
            rows.append({"model": model_name, "error": f"clipforge-pretrain exit {rc}"})
            continue
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        timed = [r for r in records if "samples_per_s" in r and r["step"] > sizes.warmup]

        def med(key: str, timed: list[dict[str, Any]] = timed) -> float | None:
            values = [r[key] for r in timed if r.get(key) is not None]
            return statistics.median(values) if values else None

        rows.append(
            {
                "model": model_name,
                "batch": sizes.batch,
                "workers": sizes.workers,
                "steps": sizes.e2e_steps,
                "samples_per_s_per_gpu": med("samples_per_s_per_device"),
                "data_wait_frac": med("data_wait_frac"),
                "tflops": med("tflops_per_device"),
                "mfu": med("mfu"),
                "text_positions": med("text_positions"),
                "final_loss": records[-1].get("loss"),
                "wall_s": round(wall, 1),
                "run_dir": str(run),
            }
        )
    return {"shards": str(shards), "generate_s": round(gen_s, 1), "rows": rows}


# ----------------------------------------------------------------------------- embed + eval


def embed_eval(sizes: Sizes, device: Any, work: Path, model_dir: Path | None) -> dict[str, Any]:
    """Embed generated samples with a trained model on the GPU, then rank all captions against
    all images with eval's exact blocked similarity on the GPU; GPU == CPU on a slice."""
    import numpy as np
    import torch

    from clipforge.eval.metrics import blocked_ranks, retrieval_metrics
    from clipforge.index.embed import EmbedConfig, embed

    out: dict[str, Any] = {}
    if model_dir is None:
        raise RuntimeError("no trained model (the end-to-end training stage did not finish)")
    t = time.perf_counter()
    shards = make_shards(work, sizes.embed_samples, sizes.distinct, sizes.workers, "embed")
    out["generate_s"] = round(time.perf_counter() - t, 1)
    emb_dir = work / "emb"
    cfg = EmbedConfig(
        model=str(model_dir),
        data=str(shards),
        out=str(emb_dir),
        dtype="float16",
        batch_size=sizes.embed_batch,
        workers=sizes.workers,
        device="cuda" if device.type == "cuda" else "cpu",
        progress="none",
        overwrite=True,
    )
    result = embed(cfg)
    out["embed"] = {
        "samples": result.samples,
        "seconds": round(result.seconds, 2),
        "samples_per_s": round(result.samples_per_s, 1),
        "batch": sizes.embed_batch,
        "workers": sizes.workers,
        "skipped": result.skipped,
    }

    def load(sub: str, stem: str) -> torch.Tensor:
        parts = sorted(
            (emb_dir / sub).glob(f"{stem}_*.npy"), key=lambda p: int(p.stem.rsplit("_", 1)[1])
        )
        return torch.from_numpy(np.concatenate([np.load(p) for p in parts]).astype(np.float32))

    image, text = load("img_emb", "img_emb"), load("text_emb", "text_emb")  # (N, D) each
    n = image.shape[0]
    groups = torch.arange(n)
    _sync(device)
    t = time.perf_counter()
    ranks = blocked_ranks(text, image, groups, groups, device=device)
    _sync(device)
    sim_s = time.perf_counter() - t
    metrics = retrieval_metrics(ranks, (1, 5, 10))
    out["similarity"] = {
        "queries": n,
        "candidates": n,
        "device": str(device),
        "seconds": round(sim_s, 2),
        "scores_per_s": round(n * n / sim_s, 1),
        "R@1": metrics["R@1"],
        "R@10": metrics["R@10"],
        "tied_queries": metrics.get("tied_queries"),
    }
    if device.type == "cuda":  # eval's tie-exact float64 accumulation: GPU ranks == CPU ranks
        m = min(n, 4096)
        gpu = blocked_ranks(text[:m], image[:m], groups[:m], groups[:m], device=device)
        cpu = blocked_ranks(text[:m], image[:m], groups[:m], groups[:m], device="cpu")
        out["similarity"]["gpu_equals_cpu_on"] = m
        out["similarity"]["gpu_equals_cpu"] = all(
            torch.equal(getattr(gpu, k).cpu(), getattr(cpu, k))
            for k in ("index", "optimistic", "pessimistic")
        )
    out["emb_dir"] = str(emb_dir)
    return out


def faiss_build(work: Path, device: Any) -> dict[str, Any]:
    """``clipforge-index build`` of the embeddings: on the GPU when faiss sees one (``--gpu``),
    else on the CPU, saying why."""
    import faiss

    from clipforge.index.cli import main as index_main

    emb_dir = work / "emb"
    if not (emb_dir / "embeddings.json").exists():
        raise RuntimeError("no embeddings (the embed stage did not finish)")
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    out: dict[str, Any] = {"faiss": faiss.__version__, "faiss_gpus": ngpu}
    if ngpu == 0:
        out["note"] = (
            "faiss has no GPU support here (faiss-cpu, or faiss-gpu without a visible GPU): built "
            "on the CPU; faiss-gpu needs its own wheel (~135 MB), see benchmarks/README.md"
        )
    for where in ["--gpu", "--cpu"] if ngpu else ["--cpu"]:
        t = time.perf_counter()
        rc = index_main(
            ["build", "--embeddings", str(emb_dir), "--out", str(work / f"index{where}"),
             "--kind", "auto", where]
        )  # fmt: skip
        out[where.lstrip("-")] = {"returncode": rc, "seconds": round(time.perf_counter() - t, 2)}
        if rc == 0:
            manifest = json.loads((work / f"index{where}" / "index.json").read_text())
            out[where.lstrip("-")]["indexes"] = {
                m: {k: v.get(k) for k in ("factory", "device", "measured_recall_at_10")}
                for m, v in manifest.get("modalities", {}).items()
            }
    return out


# ----------------------------------------------------------------------------- summary


def summary(results: dict[str, Any]) -> str:
    st = results["stages"]
    env = st.get("environment", {})
    lines = [
        f"clipforge GPU check{' (DRY RUN on CPU)' if results['dry_run'] else ''}: "
        f"{env.get('gpu_name') or env.get('device', '?')}, torch {env.get('torch')}, "
        f"CUDA {env.get('torch_cuda')}, peak bf16 {env.get('peak_bf16_tflops') or '-'} TFLOP/s; "
        f"{results.get('elapsed_s', 0):.0f} s of {results['budget_s']:.0f}"
    ]
    for name in ("pytest_gpu", "pytest_cpu_subset"):
        s = st.get(name, {})
        if s.get("status") == "ok":
            fails = [f["test"] for f in s.get("failed_tests", [])][:4]
            lines.append(
                f"{name}: {s.get('passed', '?')} passed, {s.get('failures', 0)} failed, "
                f"{s.get('errors', 0)} errors, {s.get('skipped', 0)} skipped in "
                f"{s.get('wall_s')} s" + (f"; FAILED {fails}" if fails else "")
            )
        else:
            lines.append(f"{name}: {_status(s)}")
    header = (
        f"{'model':<15}{'tool':<11}{'pooled':>7}{'compile':>8}{'batch':>6}{'samples/s':>11}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'MFU(model)':>11}{'mem GB':>8}"
    )
    for name in ("train_synthetic", "train_compile"):
        s = st.get(name, {})
        lines.append(f"{name}: {_status(s)}")
        if s.get("rows"):
            lines.append("  " + header)
            for r in s["rows"]:
                if "error" in r:
                    lines.append(f"  {r['model']:<15}{r['tool']:<11} ERROR {r['error'][:70]}")
                    continue
                pooled = "-" if r.get("pooled_forward") is None else str(r["pooled_forward"])
                lines.append(
                    f"  {r['model']:<15}{r['tool']:<11}{pooled:>7}{r['compile']!s:>8}"
                    f"{r['batch']:>6}{r['samples_per_s']:>11.1f}{_f(r.get('tflops')):>9}"
                    f"{_pct(r.get('mfu')):>7}{_pct(r.get('mfu_model_flops')):>11}"
                    f"{_f(r.get('peak_memory_gb')):>8}"
                )
    s = st.get("train_e2e", {})
    lines.append(f"train_e2e (clipforge-pretrain, real reader): {_status(s)}")
    for r in s.get("rows", []):
        if "error" in r:
            lines.append(f"  {r['model']}: ERROR {r['error']}")
        else:
            lines.append(
                f"  {r['model']:<15} batch {r['batch']} workers {r['workers']}: "
                f"{_f(r['samples_per_s_per_gpu'])} samples/s/GPU, {_f(r['tflops'])} TFLOP/s, "
                f"MFU {_pct(r['mfu'])}, data-wait {_pct(r['data_wait_frac'])}"
            )
    s = st.get("embed_eval", {})
    lines.append(f"embed_eval: {_status(s)}")
    if "embed" in s:
        e, m = s["embed"], s.get("similarity", {})
        lines.append(
            f"  embed {e['samples']} samples: {e['samples_per_s']} samples/s; similarity "
            f"{m.get('queries')}x{m.get('candidates')} on {m.get('device')} in {m.get('seconds')} s"
            + (f", GPU==CPU ranks: {m['gpu_equals_cpu']}" if "gpu_equals_cpu" in m else "")
        )
    s = st.get("faiss", {})
    lines.append(
        f"faiss: {_status(s)}"
        + (
            f" gpus={s.get('faiss_gpus')} " + json.dumps(s.get("gpu") or s.get("cpu"))
            if s.get("status") == "ok"
            else ""
        )
    )
    return "\n".join(lines)


def _status(s: dict[str, Any]) -> str:
    if not s:
        return "not run"
    extra = s.get("error") or s.get("reason") or ""
    return f"{s['status']} ({s.get('seconds', 0)} s)" + (f": {extra[:150]}" if extra else "")


def _f(v: Any) -> str:
    return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, CUDA parts skipped")
    p.add_argument("--out", default="runs/gpu-check/gpu_check.json", help="figures JSON")
    p.add_argument("--work-dir", help="generated shards, runs, embeddings (default: a temp dir)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget (420; dry 1200)")
    p.add_argument("--workers", type=int, default=None, help="data workers (default cores - 2)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch per GPU (256)")
    p.add_argument("--skip", default="", help="comma-separated stage names not to run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("gpu_check: error: no CUDA device is visible (use --dry-run on a CPU machine)")
        return 2
    device = torch.device("cuda" if cuda and not args.dry_run else "cpu")
    workers = args.workers or max(1, (os.cpu_count() or 2) - 2)
    sizes = dry_sizes() if args.dry_run else real_sizes(workers)
    if args.batch_size:
        sizes = Sizes(**{**sizes.__dict__, "batch": args.batch_size})
    budget = args.budget_s or (1200 if args.dry_run else 420)
    out = Path(args.out)
    check = Check(out, budget, args.dry_run)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dry_reason = {"status": "skipped", "reason": "dry run on CPU: CUDA only"}
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
            work.mkdir(parents=True, exist_ok=True)
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu-check-")))
        st = sizes.stage_s

        def run(name: str, fn: Callable[[], dict[str, Any]], min_s: float = 5) -> dict:
            if name in skip:
                check.results["stages"][name] = {"status": "skipped", "reason": "--skip"}
                return check.results["stages"][name]
            return check.stage(name, fn, st.get(name, 60), min_s)

        check.stage("environment", lambda: environment(device), st.get("environment", 60))
        gpu_tests = ["-m", "gpu", "tests/test_gpu"]
        run(
            "pytest_gpu",
            lambda: run_pytest(gpu_tests, st["pytest_gpu"], work, "gpu", hide_gpu=args.dry_run),
        )
        eager = [("clipforge", True, False), ("open_clip", True, False)]
        if not args.dry_run:  # the dry run checks the code path once, not every variant
            eager.append(("clipforge", False, False))
        synthetic = run("train_synthetic", lambda: train_matrix(sizes, device, eager))
        e2e = run("train_e2e", lambda: train_e2e(sizes, device, work, args.dry_run))
        model_dir = next(
            (
                Path(r["run_dir"]) / "model"
                for r in e2e.get("rows", [])
                if "run_dir" in r and (Path(r["run_dir"]) / "model").exists()
            ),
            None,
        )
        run("embed_eval", lambda: embed_eval(sizes, device, work, model_dir))
        run("faiss", lambda: faiss_build(work, device))
        if args.dry_run:  # torch.compile on the CPU needs a C++ toolchain and minutes
            check.results["stages"]["train_compile"] = dry_reason
        else:
            compiled = [
                ("clipforge", True, True),
                ("clipforge", False, True),
                ("open_clip", True, True),
            ]
            eager_rows = synthetic.get("rows", [])
            matrix = lambda: train_matrix(sizes, device, compiled, eager_rows)  # noqa: E731
            run("train_compile", matrix, min_s=60)
        subset = DRY_CPU_SUBSET if args.dry_run else CPU_SUBSET
        cpu_args = ["-m", "not gpu", *subset]
        run(
            "pytest_cpu_subset",
            lambda: run_pytest(cpu_args, st["pytest_cpu_subset"], work, "cpu", args.dry_run),
        )
        check.save()
    text = summary(check.results)
    check.results["summary"] = text
    check.save()
    print("\n" + text)
    print(f"\nfigures -> {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
