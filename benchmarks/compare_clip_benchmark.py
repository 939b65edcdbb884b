"""clipforge vs CLIP_benchmark on the same checkpoint and data, side by side.

    python -m benchmarks.compare_clip_benchmark --model RUN --data SHARDS \
        [--classnames classes.txt] [--peer-python VENV/bin/python] [--json OUT]

The CLIP_benchmark venv's python comes from ``--peer-python`` or ``$CLIPFORGE_PEER_CLIPBENCH``
(README.md in this folder says how to make it); it is checked before clipforge evaluates.

1. clipforge evaluates the model (retrieval; zero-shot when class names are given), fp32.
2. The evaluated samples are written in CLIP_benchmark's webdataset layout
   (``ROOT/test/0.tar`` + ``test/nshards.txt`` + ``dataset_type.txt``; for classification also
   ``classnames.txt``, ``zeroshot_classification_templates.txt`` and a ``.cls`` member), in
   clipforge's canonical order, one shard, so both tools index images and captions identically
   (an image with several captions: its captions as lines of one ``.txt``, CLIP_benchmark's
   layout).
3. CLIP_benchmark 1.6.2 runs in its own venv through ``peer_clip_benchmark.py``,
   at fp32 (``--no_amp``), one data-loader process (so its batches arrive in file order).
4. Both sets of figures are printed side by side, with clipforge's tie counts and tie bounds:
   the tools agree when every figure is within 0.1 point, or -- where exact score ties make
   ``torch.topk``'s unspecified choice matter -- within clipforge's optimistic..pessimistic
   bounds (reported as such, never silently).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.peer_python import CLIP_BENCHMARK, PeerError, peer_env, peer_python
from clipforge.data_tools.outputs import outputs_removed_on_failure
from clipforge.data_tools.reader import ShardSpecError, parse_shard_spec
from clipforge.data_tools.shardformat import (
    IMAGE_MEMBER_EXTENSIONS,
    ManifestError,
    ShardReadError,
    iter_tar_members,
    split_member_name,
)
from clipforge.eval.data import EmbeddedSet, EvalDataConfig, EvalDataError, embed_eval_set
from clipforge.eval.metrics import parse_ks
from clipforge.eval.report import ReportError, make_report, table, write_report
from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval
from clipforge.eval.zeroshot import (
    ZeroShotConfig,
    build_classifier,
    evaluate_zeroshot,
    label_indices,
    load_classnames,
    load_templates,
)
from clipforge.pretrain.config import ConfigError
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import LoadedModel, load_model

PROG = "benchmarks.compare_clip_benchmark"
PEER_SCRIPT = Path(__file__).with_name("peer_clip_benchmark.py")
AGREE_POINTS = 0.1
"""Figures must agree to this many percentage points."""

Log = Callable[[str], None]


@dataclass(frozen=True)
class CompareConfig:
    """What the comparison runs."""

    peer_python: str
    """Python of the venv holding clip_benchmark 1.6.2 (see :func:`peer_python`)."""
    ks: tuple[int, ...] = (1, 5, 10)
    """Recall@K values."""
    classnames: str | None = None
    """Class names (file or comma list) for zero-shot; None: retrieval only."""
    label_field: str = "category"
    """Sample .json field with the class label."""
    templates: str | None = None
    """Templates file (default: the shipped ImageNet templates)."""
    work_dir: str | None = None
    """Where converted data, weights and CLIP_benchmark's output go (default: a temp folder)."""
    batch_size: int = 256
    """Batch size of both tools."""


def _raw_images(data: str) -> dict[tuple[str, str], tuple[str, bytes]]:
    """(shard file name, key) -> (image extension, image bytes) of every sample in ``data``.

    A damaged shard gives the samples read before the damage: clipforge's reader skipped the
    rest too, so no evaluated sample is missing here."""
    members: dict[tuple[str, str], dict[str, bytes]] = {}
    for src in parse_shard_spec(data):
        for url in src.urls:
            shard = Path(url).name
            try:
                for name, blob in iter_tar_members(url):
                    key, ext = split_member_name(name)
                    if ext:
                        members.setdefault((shard, key), {})[ext.lower()] = blob
            except ShardReadError:
                continue
    out = {}
    for where, found in members.items():
        ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in found), None)
        if ext is not None:
            out[where] = (ext, found[ext])
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
    raw = _raw_images(data)
    first_sample: dict[int, int] = {}
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


def _run_peer(
    cfg: CompareConfig, work: Path, task: str, root: Path, extra: list[str]
) -> dict[str, Any]:
    """``clip_benchmark eval`` of ``task`` on the dataset at ``root``; its metrics."""
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
    env = peer_env()
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise EvalDataError(f"CLIP_benchmark failed (exit {proc.returncode}):\n{tail}")
    metrics: dict[str, Any] = json.loads(out.read_text())["metrics"]
    return metrics


def _row(name: str, ours: float, theirs: float, lo: float | None, hi: float | None) -> list[str]:
    diff = round(100 * (ours - theirs), 3) + 0.0  # + 0.0: no "-0.000" for float32 vs 64 noise
    bounds = f"{100 * lo:.2f}..{100 * hi:.2f}" if lo is not None and hi is not None else ""
    within = lo is not None and hi is not None and hi - 1e-9 <= theirs <= lo + 1e-9
    ok = abs(diff) <= AGREE_POINTS + 1e-9
    verdict = "agree" if ok else ("ties" if within else "DIFFER")
    return [name, f"{100 * ours:.2f}", f"{100 * theirs:.2f}", f"{diff:+.3f}", bounds, verdict]


@dataclass(frozen=True)
class _Run:
    """What both tools' tasks share: the loaded model, its embedded data, the scratch folder."""

    cfg: CompareConfig
    loaded: LoadedModel
    data: str
    emb: EmbeddedSet
    info: DistInfo
    work: Path


def _compare_retrieval(run: _Run) -> tuple[dict[str, Any], dict[str, Any], list[list[str]]]:
    """Retrieval by both tools; (clipforge's figures, CLIP_benchmark's, the table rows)."""
    cfg = run.cfg
    ours = evaluate_retrieval(run.emb, run.info, RetrievalConfig(ks=cfg.ks, device="cpu"))
    root = write_clip_benchmark_wds(run.emb, run.data, run.work / "wds_retrieval", "retrieval")
    theirs = _run_peer(cfg, run.work, "zeroshot_retrieval", root, ["--recall_k", *map(str, cfg.ks)])
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
    return ours, theirs, rows


def _compare_zeroshot(
    run: _Run, classnames: str
) -> tuple[dict[str, Any], dict[str, Any], list[list[str]]]:
    """Zero-shot classification by both tools; (clipforge's figures, CLIP_benchmark's, rows)."""
    cfg, loaded = run.cfg, run.loaded
    names = load_classnames(classnames)
    tmpl = load_templates(cfg.templates)
    classifier = build_classifier(
        loaded.model, loaded.tokenizer, names, tmpl, run.info.device, ZeroShotConfig()
    )
    ours = evaluate_zeroshot(run.emb, classifier, names)
    targets = label_indices(run.emb.labels, names)
    root = write_clip_benchmark_wds(
        run.emb, run.data, run.work / "wds_classification", "classification", names, tmpl, targets
    )
    theirs = _run_peer(cfg, run.work, "zeroshot_classification", root, [])
    rows = [
        _row(f"zero-shot {key}", float(ours[key]), float(theirs[key]), None, None)
        for key in ("acc1", "acc5", "mean_per_class_recall")
    ]
    return ours, theirs, rows


def _print_verdict(
    rows: list[list[str]], retrieval: dict[str, Any], log: Log
) -> tuple[dict[str, int], bool]:
    """The table, the tie counts and the verdict; (tied queries per direction, agree)."""
    header = ["figure (%)", "clipforge", "CLIP_benchmark", "diff", "clipforge ties", ""]
    log(table(rows, header))
    ties = {d: int(retrieval[d]["tied_queries"]) for d in retrieval}
    log(
        f"tied queries (a negative scored exactly as the best positive): "
        f"text->image {ties['text_to_image']} of {retrieval['text_to_image']['queries']}, "
        f"image->text {ties['image_to_text']} of {retrieval['image_to_text']['queries']}. "
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
    return ties, agree


def run_comparison(
    model: str,
    data: str,
    cfg: CompareConfig,
    model_name: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Run both tools, print the side-by-side table, return the result object (``metrics``:
    both tools' figures, the rows, and ``agree``)."""
    t0 = time.perf_counter()
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    loaded = load_model(model, "cpu", model_name)
    with _work_dir(cfg.work_dir) as work:
        # The exact weights and config clipforge evaluates, in the form open_clip loads.
        torch.save(loaded.model.state_dict(), work / "weights.bin")
        (work / "model_config.json").write_text(json.dumps(_model_config()))
        dcfg = EvalDataConfig(batch_size=cfg.batch_size, workers=0, label_field=cfg.label_field)
        emb = embed_eval_set(
            loaded.model, loaded.tokenizer, loaded.image_transforms(), data, dcfg, info
        )
        log(f"clipforge: {emb.image_emb.shape[0]} images, {len(emb.captions)} captions")
        run = _Run(cfg, loaded, data, emb, info, work)
        ours, theirs, rows = _compare_retrieval(run)
        zs_ours = zs_theirs = None
        if cfg.classnames is not None:
            zs_ours, zs_theirs, zs_rows = _compare_zeroshot(run, cfg.classnames)
            rows += zs_rows
        ties, agree = _print_verdict(rows, ours, log)
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


@contextlib.contextmanager
def _work_dir(work_dir: str | None) -> Iterator[Path]:
    """``work_dir`` (created), or a temporary folder removed on exit when it is None."""
    if work_dir:
        path = Path(work_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipforge-cb-") as tmp:
        yield Path(tmp)


def _model_config() -> dict[str, Any]:
    """The open_clip model config of the loaded model (what load_model registered)."""
    import open_clip

    cfg = open_clip.get_model_config("clipforge-loaded")
    if cfg is None:
        raise EvalDataError("the loaded model's open_clip config is not registered")
    return dict(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="run dir, model/ folder, step checkpoint, or "
        "a plain open_clip weights file (with --model-name)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        help="open_clip model name or model-config JSON, for a plain weights file",
    )
    parser.add_argument(
        "--data", required=True, help="SHARDS (folder of .tar, brace pattern, glob, '::'-joined)"
    )
    parser.add_argument("--k", default="1,5,10", help="K values of Recall@K")
    parser.add_argument(
        "--classnames",
        default=None,
        help="also compare zero-shot classification with these class names",
    )
    parser.add_argument(
        "--label-field", default="category", help="sample .json field holding the label"
    )
    parser.add_argument(
        "--templates",
        default=None,
        help="prompt templates file, one per line with {c}; default: ImageNet's 80",
    )
    parser.add_argument(
        "--peer-python",
        default=None,
        help=f"python of the venv with clip_benchmark==1.6.2 (default ${CLIP_BENCHMARK.env_var})",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the converted data goes (default: a temporary folder)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="samples per embedding batch")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison: 0 when the tools agree, 1 when they differ, 2 with a one-line error
    for bad input or a missing peer."""
    args = build_parser().parse_args(argv)
    expected = (
        PeerError,
        EvalDataError,
        ReportError,
        ShardSpecError,
        ManifestError,
        ConfigError,
        OSError,  # a path that cannot be written or read: the message names it
        ValueError,
        ImportError,
    )
    try:
        # A failed comparison leaves no output (nor output folder) it created.
        with outputs_removed_on_failure([args.json]) as created:
            cfg = CompareConfig(
                peer_python=peer_python(CLIP_BENCHMARK, args.peer_python),
                ks=parse_ks(args.k),
                classnames=args.classnames,
                label_field=args.label_field,
                templates=args.templates,
                work_dir=args.work_dir,
                batch_size=args.batch_size,
            )
            if args.work_dir:
                created.mkdir(args.work_dir, scratch=True)
            result = run_comparison(args.model, args.data, cfg, model_name=args.model_name)
            if args.json:
                write_report(args.json, result)
    except expected as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0 if result["metrics"].get("agree", True) else 1


if __name__ == "__main__":
    sys.exit(main())
