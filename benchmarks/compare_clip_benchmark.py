"""clipforge vs CLIP_benchmark on the same checkpoint and data, side by side.

1. clipforge evaluates the model (retrieval; zero-shot when class names are given), fp32.
2. The evaluated samples are written in CLIP_benchmark's webdataset layout
   (``ROOT/test/0.tar`` + ``test/nshards.txt`` + ``dataset_type.txt``; for classification also
   ``classnames.txt``, ``zeroshot_classification_templates.txt`` and a ``.cls`` member), in
   clipforge's canonical order, one shard, so both tools index images and captions identically
   (an image with several captions: its captions as lines of one ``.txt``, CLIP_benchmark's
   layout).
3. CLIP_benchmark 1.6.2 runs in its own venv (PEERS.md) through :mod:`peer_clip_benchmark`,
   at fp32 (``--no_amp``), one data-loader process (so its batches arrive in file order).
4. Both sets of figures are printed side by side, with clipforge's tie counts and tie bounds:
   the tools agree when every figure is within 0.1 point, or -- where exact score ties make
   ``torch.topk``'s unspecified choice matter -- within clipforge's optimistic..pessimistic
   bounds (reported as such, never silently).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.data_tools.reader import _Skips, iter_tar_samples, parse_shard_spec
from clipforge.data_tools.shardformat import IMAGE_MEMBER_EXTENSIONS
from clipforge.eval.data import EmbeddedSet, EvalDataConfig, EvalDataError, embed_eval_set
from clipforge.eval.report import make_report, table
from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval
from clipforge.eval.zeroshot import (
    ZeroShotConfig,
    build_classifier,
    evaluate_zeroshot,
    load_classnames,
    load_templates,
)
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import load_model

PEER_SCRIPT = Path(__file__).with_name("peer_clip_benchmark.py")
AGREE_POINTS = 0.1
"""Figures must agree to this many percentage points."""


@dataclass(frozen=True)
class CompareConfig:
    """What the comparison runs."""

    ks: tuple[int, ...] = (1, 5, 10)
    """Recall@K values."""
    classnames: str | None = None
    """Class names (file or comma list) for zero-shot; None: retrieval only."""
    label_field: str = "category"
    """Sample .json field with the class label."""
    templates: str | None = None
    """Templates file (default: the shipped ImageNet templates)."""
    peer_python: str = "/work/peers/clipbench/bin/python"
    """Python of the venv holding clip_benchmark 1.6.2."""
    work_dir: str | None = None
    """Where converted data, weights and CLIP_benchmark's output go (default: a temp folder)."""
    batch_size: int = 256
    """Batch size of both tools."""


def _raw_samples(data: str) -> dict[tuple[str, str], tuple[str, bytes]]:
    """(shard file name, key) -> (image extension, image bytes) of every sample in ``data``."""
    out = {}
    skips = _Skips("skip")
    for src in parse_shard_spec(data):
        for url in src.urls:
            for s in iter_tar_samples(url, skips):
                ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in s.members), None)
                if ext is not None:
                    out[(Path(url).name, s.key)] = (ext, s.members[ext])
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_clip_benchmark_wds(
    emb: EmbeddedSet,
    data: str,
    root: Path,
    kind: str,
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    targets: torch.Tensor | None = None,
) -> Path:
    """Write ``emb``'s images (and captions or class indices) as CLIP_benchmark's wds dataset."""
    raw = _raw_samples(data)
    first_sample = {}
    for s, img in enumerate(emb.sample_image.tolist()):
        first_sample.setdefault(img, s)
    captions: list[list[str]] = [[] for _ in range(emb.image_emb.shape[0])]
    for cap, img in zip(emb.captions, emb.text_image.tolist(), strict=True):
        captions[img].append(cap)
    test = root / "test"
    test.mkdir(parents=True, exist_ok=True)
    with tarfile.open(test / "0.tar", "w") as tar:
        for img in range(emb.image_emb.shape[0]):
            ext, blob = raw[emb.sample_keys[first_sample[img]]]
            key = f"{img:08d}"
            _add(tar, f"{key}.{ext}", blob)
            if kind == "retrieval":
                _add(tar, f"{key}.txt", "\n".join(captions[img]).encode())
            else:
                assert targets is not None
                _add(tar, f"{key}.cls", str(int(targets[img])).encode())
    (test / "nshards.txt").write_text("1\n")
    (root / "dataset_type.txt").write_text(
        "retrieval\n" if kind == "retrieval" else "classification\n"
    )
    if kind != "retrieval":
        assert classnames is not None and templates is not None
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def _run_peer(cfg: CompareConfig, work: Path, task: str, root: Path, extra: list[str]) -> dict:
    out = work / f"clip_benchmark_{task}.json"
    cmd = [
        cfg.peer_python,
        str(PEER_SCRIPT),
        "--model-config",
        str(work / "model_config.json"),
        "--name",
        "clipforge-compared",
        "--",
        "--dataset",
        f"wds/clipforge_{task}",
        "--dataset_root",
        str(root),
        "--task",
        task,
        "--model",
        "clipforge-compared",
        "--pretrained",
        str(work / "weights.bin"),
        "--no_amp",
        "--num_workers",
        "0",
        "--batch_size",
        str(cfg.batch_size),
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise EvalDataError(f"CLIP_benchmark failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())["metrics"]


def _row(name: str, ours: float, theirs: float, lo: float | None, hi: float | None) -> list[str]:
    diff = round(100 * (ours - theirs), 3) + 0.0  # + 0.0: no "-0.000" for float32 vs 64 noise
    bounds = f"{100 * lo:.2f}..{100 * hi:.2f}" if lo is not None and hi is not None else ""
    within = lo is not None and hi is not None and hi - 1e-9 <= theirs <= lo + 1e-9
    ok = abs(diff) <= AGREE_POINTS + 1e-9
    verdict = "agree" if ok else ("ties" if within else "DIFFER")
    return [name, f"{100 * ours:.2f}", f"{100 * theirs:.2f}", f"{diff:+.3f}", bounds, verdict]


def run_comparison(
    model: str,
    data: str,
    cfg: CompareConfig = CompareConfig(),
    model_name: str | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Run both tools, print the side-by-side table, return the result object (``metrics``:
    both tools' figures, the rows, and ``agree``)."""
    if not Path(cfg.peer_python).is_file():
        raise EvalDataError(
            f"no CLIP_benchmark python at {cfg.peer_python}: make its venv (shared/PEERS.md: "
            f"torch, open_clip_torch 3.3.0, clip_benchmark==1.6.2, requests, scikit-learn, "
            f"numpy<2.4) or pass --peer-python"
        )
    t0 = time.perf_counter()
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    loaded = load_model(model, "cpu", model_name)
    tmp = None
    if cfg.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="clipforge-cb-")
        work = Path(tmp.name)
    else:
        work = Path(cfg.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        # The exact weights and config clipforge evaluates, in the form open_clip loads.
        torch.save(loaded.model.state_dict(), work / "weights.bin")
        cfg_dict = _model_config(loaded)
        (work / "model_config.json").write_text(json.dumps(cfg_dict))

        dcfg = EvalDataConfig(batch_size=cfg.batch_size, workers=0, label_field=cfg.label_field)
        emb = embed_eval_set(
            loaded.model, loaded.tokenizer, loaded.image_transforms(), data, dcfg, info
        )
        ours = evaluate_retrieval(emb, info, RetrievalConfig(ks=cfg.ks, device="cpu"))
        log(f"clipforge: {emb.image_emb.shape[0]} images, {len(emb.captions)} captions")
        root = write_clip_benchmark_wds(emb, data, work / "wds_retrieval", "retrieval")
        theirs = _run_peer(cfg, work, "zeroshot_retrieval", root, ["--recall_k", *map(str, cfg.ks)])
        rows = []
        for d, their_key in (
            ("text_to_image", "image_retrieval_recall@{k}"),
            ("image_to_text", "text_retrieval_recall@{k}"),
        ):
            for k in cfg.ks:
                m = ours[d]
                rows.append(
                    _row(
                        f"{d} R@{k}",
                        float(m[f"R@{k}"]),
                        float(theirs[their_key.format(k=k)]),
                        float(m[f"R@{k}_optimistic"]),
                        float(m[f"R@{k}_pessimistic"]),
                    )
                )
        zs_ours = zs_theirs = None
        if cfg.classnames is not None:
            names = load_classnames(cfg.classnames)
            tmpl = load_templates(cfg.templates)
            classifier = build_classifier(
                loaded.model, loaded.tokenizer, names, tmpl, info.device, ZeroShotConfig()
            )
            zs_ours = evaluate_zeroshot(emb, classifier, names)
            from clipforge.eval.zeroshot import label_indices

            targets = label_indices(emb.labels, names)
            root_c = write_clip_benchmark_wds(
                emb, data, work / "wds_classification", "classification", names, tmpl, targets
            )
            zs_theirs = _run_peer(cfg, work, "zeroshot_classification", root_c, [])
            for ours_key, their_key in (
                ("acc1", "acc1"),
                ("acc5", "acc5"),
                ("mean_per_class_recall", "mean_per_class_recall"),
            ):
                rows.append(
                    _row(
                        f"zero-shot {ours_key}",
                        float(zs_ours[ours_key]),
                        float(zs_theirs[their_key]),
                        None,
                        None,
                    )
                )
        header = ["figure (%)", "clipforge", "CLIP_benchmark", "diff", "clipforge ties", ""]
        log(table(rows, header))
        ties = {d: int(ours[d]["tied_queries"]) for d in ours}
        log(
            f"tied queries (a negative scored exactly as the best positive): "
            f"text->image {ties['text_to_image']} of {ours['text_to_image']['queries']}, "
            f"image->text {ties['image_to_text']} of {ours['image_to_text']['queries']}. "
            f"clipforge breaks ties by data order (lower index first); 'clipforge ties' is the "
            f"best..worst figure over all tie orders."
        )
        agree = all(r[-1] in ("agree", "ties") for r in rows)
        log(
            "verdict: "
            + (
                f"the tools agree (every figure within {AGREE_POINTS} point"
                + (", or within the tie bounds)" if any(r[-1] == "ties" for r in rows) else ")")
                if agree
                else "the tools DIFFER beyond 0.1 point and beyond the tie bounds"
            )
        )
        return make_report(
            "compare-clip-benchmark",
            {
                "clipforge": {"retrieval": ours, "zeroshot": zs_ours},
                "clip_benchmark": {"retrieval": theirs, "zeroshot": zs_theirs},
                "rows": rows,
                "tied_queries": ties,
                "agree": agree,
            },
            {"source": loaded.source, "hash": loaded.model_hash, "name": model_name},
            {"spec": data, "samples": emb.samples},
            {
                "ks": list(cfg.ks),
                "classnames": cfg.classnames,
                "label_field": cfg.label_field,
                "peer_python": cfg.peer_python,
                "batch_size": cfg.batch_size,
            },
            [sys.argv[0], *sys.argv[1:]],
            time.perf_counter() - t0,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def _model_config(loaded: Any) -> dict[str, Any]:
    """The open_clip model config of a loaded model (what load_model registered)."""
    import open_clip

    cfg = open_clip.get_model_config("clipforge-loaded")
    if cfg is None:
        raise EvalDataError("the loaded model's open_clip config is not registered")
    return dict(cfg)
