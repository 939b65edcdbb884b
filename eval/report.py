"""Results as JSON (written atomically) and as readable tables; side-by-side comparison; plots.

A result file is one JSON object::

    {"format": "clipforge-eval/1", "task": "retrieval" | "zeroshot" | "index",
     "metrics": {...}, "model": {"source", "hash", "name"}, "data": {spec, manifests...},
     "config": {...}, "command": [...], "created": ISO time, "elapsed_s": ...}
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipforge.data_tools.atomic import write_json_atomic

FORMAT = "clipforge-eval/1"


class ReportError(ValueError):
    """A result file cannot be read or plotted (the message says why)."""


def make_report(
    task: str,
    metrics: dict[str, Any],
    model: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    command: Sequence[str] | None = None,
    elapsed_s: float | None = None,
) -> dict[str, Any]:
    """The result object of one evaluation."""
    return {
        "format": FORMAT,
        "task": task,
        "metrics": metrics,
        "model": model or {},
        "data": data or {},
        "config": config or {},
        "command": list(command) if command is not None else list(sys.argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": elapsed_s,
    }


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write ``report`` as JSON to ``path`` atomically (temp file + rename)."""
    out = Path(path)
    write_json_atomic(out, _jsonable(report))
    return out


def read_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A result file written by :func:`write_report`."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{p} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{p}: not a readable JSON file ({e})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ReportError(f"{p}: not a clipforge-eval result (format {FORMAT!r})")
    return obj


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


# ----------------------------------------------------------------------------- tables


def _fmt(v: Any, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and pct:
        return f"{100 * v:.2f}"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(r, widths, strict=False))
    )
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def format_retrieval(metrics: dict[str, Any]) -> str:
    """Recall@K (percent), ranks and ties per direction; index figures beside when present."""
    ks = sorted(
        {
            int(k[2:])
            for m in metrics.get("exact", metrics).values()
            if isinstance(m, dict)
            for k in m
            if k.startswith("R@") and k[2:].isdigit()
        }
    )
    exact = metrics.get("exact", metrics)
    index = metrics.get("index", {})
    header = ["direction", *[f"R@{k}" for k in ks], "mean rank", "median rank", "queries", "tied"]
    rows = []
    # the two caption directions first, then any queried by a .json field ("name_to_image")
    extra = sorted(d for d in exact if d.endswith("_to_image") and d != "text_to_image")
    for d in ("text_to_image", "image_to_text", *extra):
        m = exact.get(d)
        if not isinstance(m, dict):
            continue
        rows.append(
            [
                d.replace("_", " "),
                *[_fmt(m.get(f"R@{k}"), True) for k in ks],
                _fmt(m.get("mean_rank"), False),
                _fmt(m.get("median_rank"), False),
                str(m.get("queries", "")),
                str(m.get("tied_queries", "")),
            ]
        )
        if m.get("tied_queries"):
            rows.append(
                [
                    "  (ties: best..worst)",
                    *[
                        f"{_fmt(m.get(f'R@{k}_optimistic'), True)}.."
                        f"{_fmt(m.get(f'R@{k}_pessimistic'), True)}"
                        for k in ks
                    ],
                    "",
                    "",
                    "",
                    "",
                ]
            )
        if d in index:
            im = index[d]
            rows.append(
                [
                    f"  index {im.get('factory', '')}".rstrip(),
                    *[_fmt(im.get(f"R@{k}"), True) for k in ks],
                    "",
                    "",
                    str(im.get("queries", "")),
                    "",
                ]
            )
    return table(rows, header)


def format_zeroshot(metrics: dict[str, Any]) -> str:
    """Top-K accuracy and mean per-class recall (percent)."""
    keys = [k for k in metrics if k.startswith("acc")] + ["mean_per_class_recall"]
    header = ["metric", "value"]
    rows = [[k, _fmt(metrics.get(k), True)] for k in keys]
    rows += [[k, _fmt(metrics.get(k), False)] for k in ("samples", "classes", "classes_present")]
    return table(rows, header)


def format_index(metrics: dict[str, Any]) -> str:
    """One row per searched modality: recall vs exact, QPS, latency, memory."""
    header = [
        "index",
        "queries",
        "recall@k",
        "k",
        "QPS batched",
        "QPS single",
        "p50 ms",
        "p99 ms",
        "memory MB",
        "vectors",
    ]
    rows = []
    for name, m in metrics.items():
        if not isinstance(m, dict):
            continue
        rows.append(
            [
                f"{name} ({m.get('factory', '?')})",
                str(m.get("queries", "")),
                _fmt(m.get("recall"), False),
                str(m.get("k", "")),
                f"{m.get('qps_batched', float('nan')):,.0f}",
                f"{m.get('qps_single', float('nan')):,.0f}",
                f"{m.get('latency_p50_ms', float('nan')):.3f}",
                f"{m.get('latency_p99_ms', float('nan')):.3f}",
                f"{m.get('memory_mb', float('nan')):.1f}",
                str(m.get("vectors", "")),
            ]
        )
    return table(rows, header)


def format_report(report: dict[str, Any]) -> str:
    """The console table of a result object."""
    task = report.get("task")
    m = report.get("metrics", {})
    head = []
    model = report.get("model", {})
    if model:
        head.append(f"model {model.get('source', '?')} (hash {model.get('hash', '?')})")
    data = report.get("data", {})
    if data.get("spec"):
        head.append(
            f"data  {data['spec']}"
            + (f" ({data['samples']} samples)" if data.get("samples") else "")
        )
    head += format_skipped(data.get("skipped") or {})
    body = {
        "retrieval": format_retrieval,
        "zeroshot": format_zeroshot,
        "index": format_index,
    }.get(str(task), lambda x: json.dumps(x, indent=2))(m)
    return "\n".join([*head, body])


def format_skipped(skipped: dict[str, int]) -> list[str]:
    """One console line per reason samples were skipped (most first)."""
    return [
        f"skipped {n} sample(s): {reason.replace('_', ' ')}"
        for reason, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))
        if n
    ]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a/b/c": leaf}`` with numeric leaves only."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix.rstrip("/")] = obj
    return out


def format_compare(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Runs side by side: one row per metric present in any run (percent for recalls and
    accuracies), plus each run's model hash and data."""
    flats = [flatten(r.get("metrics", {})) for r in reports]
    keys: list[str] = []
    for f in flats:
        keys += [k for k in f if k not in keys]
    header = ["metric", *names]
    rows = [
        ["task", *[str(r.get("task", "?")) for r in reports]],
        ["model hash", *[str(r.get("model", {}).get("hash", "?")) for r in reports]],
        ["data", *[str(r.get("data", {}).get("spec", "?")) for r in reports]],
    ]
    for k in keys:
        leaf = k.rsplit("/", 1)[-1]
        pct = leaf.startswith(("R@", "acc")) or leaf == "mean_per_class_recall"
        rows.append([k, *[_fmt(f.get(k), pct) for f in flats]])
    return table(rows, header)


# ----------------------------------------------------------------------------- plots


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError(
            "plotting needs matplotlib, which is not installed: pip install 'clipforge[plot]'"
        ) from None
    return plt


def plot_recall_curves(
    reports: Sequence[dict[str, Any]], names: Sequence[str], out: str | os.PathLike[str]
) -> Path:
    """Recall@K against K for each run and direction (retrieval results), as a PNG."""
    plt = _pyplot()
    return _save(recall_figure(reports, names), plt, out)


def recall_figure(reports: Sequence[dict[str, Any]], names: Sequence[str]) -> Any:
    """The matplotlib figure of :func:`plot_recall_curves`: one panel per direction, K on a log
    axis whose ticks are the K values measured (1, 5, 10, ...), not powers of ten."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, d in zip(axes, ("text_to_image", "image_to_text"), strict=True):
        measured: set[int] = set()
        for r, name in zip(reports, names, strict=True):
            m = r.get("metrics", {}).get("exact", r.get("metrics", {})).get(d, {})
            ks = sorted(int(k[2:]) for k in m if k.startswith("R@") and k[2:].isdigit())
            if ks:
                ax.plot(ks, [100 * m[f"R@{k}"] for k in ks], marker="o", label=name)
                measured.update(ks)
        ax.set_xscale("log")
        if measured:
            ticks = sorted(measured)
            ax.set_xticks(ticks, [str(k) for k in ticks])
            ax.xaxis.set_minor_locator(NullLocator())  # no unlabelled 2..9 x 10^n ticks
        ax.set_xlabel("K")
        ax.set_title(d.replace("_", " "))
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("Recall@K (%)")
    axes[0].legend()
    return fig


def require_plotting() -> None:
    """Raise :class:`ReportError` now if plots cannot be made (before a long evaluation)."""
    _pyplot()


def read_metrics_jsonl(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a training run's ``metrics.jsonl`` (unparseable lines skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{run_dir}: no metrics.jsonl (not a clipforge run directory?)")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


@dataclass(frozen=True)
class TrainingCurves:
    """What :func:`plot_training` draws, read from a run's ``metrics.jsonl`` records."""

    loss: tuple[tuple[int, float], ...]
    """(step, training loss) of every logged step, in step order."""
    recall: dict[str, dict[str, tuple[tuple[int, float], ...]]]
    """Eval set name -> figure (``t2i_R@1``, ``i2t_R@10``, ...) -> (step, recall in [0, 1]),
    from ``eval/<set>/<figure>`` keys; the unnamed set of ``eval/<figure>`` keys (a run
    evaluated through the ``CLIPFORGE_EVAL_*`` variables) is named ``""``."""


def training_curves(
    records: Sequence[dict[str, Any]], ks: Sequence[int] | None = None
) -> TrainingCurves:
    """The loss and every eval set's Recall@K series of ``metrics.jsonl`` records (only the K
    values in ``ks`` when given). Records without a step, and non-numeric values, are skipped."""
    loss: list[tuple[int, float]] = []
    recall: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in records:
        step = r.get("step")
        if not isinstance(step, int):
            continue
        if _is_number(r.get("loss")):
            loss.append((step, float(r["loss"])))
        for key, value in r.items():
            if not key.startswith("eval/") or not _is_number(value):
                continue
            set_name, _, figure = key[len("eval/") :].rpartition("/")
            _, at, k = figure.partition("_R@")
            if not at or not k.isdigit() or (ks is not None and int(k) not in ks):
                continue
            recall.setdefault(set_name, {}).setdefault(figure, []).append((step, float(value)))
    return TrainingCurves(
        loss=tuple(sorted(loss)),
        recall={
            name: {fig: tuple(sorted(pts)) for fig, pts in sorted(figs.items(), key=_figure_order)}
            for name, figs in recall.items()
        },
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _figure_order(item: tuple[str, Any]) -> tuple[bool, str, int]:
    direction, _, k = item[0].partition("_R@")
    return direction != "t2i", direction, int(k)  # text->image first; R@5 before R@10


def training_figure(curves: TrainingCurves, title: str = "") -> Any:
    """The matplotlib figure of :func:`plot_training`: the loss above, every eval set's R@K
    below on the same steps (one colour per set, solid text->image, dashed image->text, one
    marker per K)."""
    plt = _pyplot()
    fig, (ax_loss, ax_recall) = plt.subplots(
        2, 1, figsize=(9, 6.5), sharex=True, gridspec_kw={"height_ratios": [1, 1.4]}
    )
    if curves.loss:
        ax_loss.plot(*zip(*curves.loss, strict=True), color="black", lw=1.2, label="train loss")
        ax_loss.legend(loc="upper right")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(True, alpha=0.3)
    if title:
        ax_loss.set_title(title)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_ks = sorted({int(f.partition("_R@")[2]) for figs in curves.recall.values() for f in figs})
    markers = dict(zip(all_ks, "os^Dvx*P", strict=False))
    for i, (name, figs) in enumerate(curves.recall.items()):
        for figure, pts in figs.items():
            direction, _, k = figure.partition("_R@")
            ax_recall.plot(
                [p[0] for p in pts],
                [100 * p[1] for p in pts],
                color=colours[i % len(colours)],
                ls="-" if direction == "t2i" else "--",
                marker=markers.get(int(k), "."),
                ms=4,
                label=f"{name or 'eval'} {direction} R@{k}",
            )
    ax_recall.set_xlabel("step")
    ax_recall.set_ylabel("Recall@K (%)")
    ax_recall.grid(True, alpha=0.3)
    if curves.recall:
        ax_recall.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    return fig


def plot_training(
    run_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    ks: Sequence[int] | None = None,
) -> Path:
    """Training loss and each eval set's Recall@K (``eval/<set>/..._R@K`` in metrics.jsonl)
    against step, as one PNG (only the K values in ``ks`` when given)."""
    records = read_metrics_jsonl(run_dir)
    curves = training_curves(records, ks)
    if not curves.loss and not curves.recall:
        raise ReportError(f"{run_dir}: metrics.jsonl holds no loss or Recall@K to plot")
    if ks is not None and not curves.recall and any("eval/" in k for r in records for k in r):
        raise ReportError(f"{run_dir}: no eval figure at K in {list(ks)} in metrics.jsonl")
    plt = _pyplot()
    return _save(training_figure(curves, title=Path(run_dir).name), plt, out)


def _save(fig: Any, plt: Any, out: str | os.PathLike[str]) -> Path:
    from clipforge.data_tools.atomic import atomic_output

    path = Path(out)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
