"""``clipforge-eval``: retrieval, zero-shot, index quality, comparisons and plots.

Thin argparse over :mod:`clipforge.eval.tasks` and friends. Bad input ends with
``clipforge-eval: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from clipforge.data_tools.cliutil import DefaultsHelpFormatter, subparser_class

PROG = "clipforge-eval"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="run dir, model/ folder, step checkpoint, or "
        "a plain open_clip weights file (with --model-name)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        help="open_clip model name or model-config JSON, for a plain weights file",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the model runs (auto: the GPU when there is one)",
    )


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help="SHARDS (folder of .tar, brace pattern, glob, '::'-joined) or an image folder",
    )
    p.add_argument("--batch-size", type=int, default=256, help="samples per embedding batch")
    p.add_argument("--workers", type=int, default=1, help="data-loader workers per rank")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="fp32, or bf16/fp16 autocast (GPU speed; figures move by ~0.1-0.5 points)",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="read at most N samples per rank (default: all)"
    )
    p.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RESULT.json",
        help="print result files side by side (same as the compare command)",
    )
    sub = parser.add_subparsers(dest="command", parser_class=subparser_class())

    r = sub.add_parser("retrieval", help="image<->text Recall@K, mean/median rank")
    _add_model(r)
    _add_data(r)
    r.add_argument("--k", default="1,5,10", help="K values of Recall@K, comma-separated")
    r.add_argument(
        "--image-id-field",
        default=None,
        help="group captions by this .json field (several captions per image); "
        "default: each sample is its own image",
    )
    r.add_argument(
        "--split-lines",
        action="store_true",
        help="each line of a caption is a separate caption of the image",
    )
    r.add_argument(
        "--index",
        default=None,
        metavar="INDEX_DIR",
        help="also measure R@K through this built index (beside the exact figure)",
    )
    r.add_argument(
        "--query-field",
        action="append",
        default=[],
        metavar="FIELD",
        help="also query the images by this .json field of each (e.g. name: the emoji demo's "
        "name-only figures, direction FIELD_to_image); repeatable",
    )
    r.add_argument(
        "--query-block", type=int, default=1024, help="queries scored per block (memory bound)"
    )
    r.add_argument(
        "--cand-block",
        type=int,
        default=16384,
        help="candidates scored per block (memory bound; figures do not depend on it)",
    )
    r.add_argument("--plot", default=None, metavar="PNG", help="Recall@K curves as a PNG")

    z = sub.add_parser("zeroshot", help="zero-shot classification: top-1/top-5, per-class recall")
    _add_model(z)
    _add_data(z)
    z.add_argument(
        "--classnames",
        default=None,
        help="file with one class name per line (or a comma-separated list); "
        "default: the distinct labels found in the data",
    )
    z.add_argument(
        "--templates",
        default=None,
        help="prompt templates file, one per line with {c}; default: ImageNet's 80",
    )
    z.add_argument(
        "--label-field",
        default=None,
        help="sample .json field holding the label (default: category; image "
        "folders: the class sub-folder)",
    )
    z.add_argument("--k", default="1,5", help="top-K accuracies, comma-separated")

    i = sub.add_parser("index", help="index recall vs exact search, QPS, latency, memory")
    i.add_argument(
        "--index", required=True, metavar="INDEX_DIR", help="an index built by clipforge-index"
    )
    i.add_argument("--queries", type=int, default=1000, help="held-out cross-modal queries")
    i.add_argument("--k", type=int, default=10, help="recall@k of the index vs exact search")
    i.add_argument(
        "--single-queries",
        type=int,
        default=200,
        help="queries timed one at a time (latency percentiles)",
    )
    i.add_argument("--json", default=None, metavar="OUT", help="write the result JSON here")

    c = sub.add_parser("compare", help="print result files side by side")
    c.add_argument(
        "results", nargs="+", metavar="RESULT.json", help="result files written with --json"
    )

    pl = sub.add_parser("plot", help="PNG of Recall@K curves (result files) or training curves")
    pl.add_argument("inputs", nargs="+", help="result JSON files, or one run directory")
    pl.add_argument("--out", required=True, metavar="PNG", help="the PNG to write")
    pl.add_argument(
        "--k",
        default=None,
        help="run directory: draw only these K values of each eval set's R@K, e.g. 1,10 "
        "(default: every K logged)",
    )

    return parser


def _error(msg: str) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = [PROG, *(sys.argv[1:] if argv is None else list(argv))]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.compare:
        args.command, args.results = "compare", args.compare
    if args.command is None:
        parser.print_help()
        return 2
    from clipforge.data_tools.reader import ShardSpecError
    from clipforge.data_tools.shardformat import ManifestError
    from clipforge.eval.data import EvalDataError
    from clipforge.eval.report import ReportError
    from clipforge.pretrain.config import ConfigError

    expected = (
        EvalDataError,
        ReportError,
        ShardSpecError,
        ManifestError,
        ConfigError,
        OSError,  # a path that cannot be written or read: the message names it
        ValueError,
    )
    from clipforge.data_tools.outputs import outputs_removed_on_failure

    try:
        # A failed command leaves no output (nor output folder) it created.
        outputs = [getattr(args, name, None) for name in ("json", "plot", "out")]
        with outputs_removed_on_failure(outputs):
            return _run(args, command)
    except expected as e:
        return _error(str(e))
    except ImportError as e:
        return _error(f"{e}")


def _run(args: argparse.Namespace, command: list[str]) -> int:
    from clipforge.eval import report as rep

    if args.command == "compare":
        reports = [rep.read_report(p) for p in args.results]
        print(rep.format_compare(reports, [Path(p).stem for p in args.results]))
        return 0
    if args.command == "plot":
        return _plot(args)
    if getattr(args, "plot", None):
        rep.require_plotting()  # fail now, not after the evaluation
    if args.command == "index":
        from clipforge.eval.index_quality import IndexQualityConfig, run_index_quality

        result = run_index_quality(
            args.index,
            IndexQualityConfig(queries=args.queries, k=args.k, single_queries=args.single_queries),
            command=command,
        )
        print(rep.format_report(result))
        if args.json:
            rep.write_report(args.json, result)
        return 0
    return _evaluate(args, command)


def _ks(text: str) -> tuple[int, ...]:
    from clipforge.eval.metrics import parse_ks

    return parse_ks(text)


def _evaluate(args: argparse.Namespace, command: list[str]) -> int:
    from clipforge.eval import report as rep
    from clipforge.eval.data import EvalDataConfig
    from clipforge.eval.tasks import run_retrieval, run_zeroshot, setup
    from clipforge.pretrain.distributed import shutdown

    for name in ("batch_size", "workers"):
        if getattr(args, name) < (1 if name == "batch_size" else 0):
            raise ValueError(
                f"--{name.replace('_', '-')} must be >= {1 if name == 'batch_size' else 0}"
            )
    info = setup(args.device)
    try:
        data_cfg = EvalDataConfig(
            batch_size=args.batch_size,
            workers=args.workers,
            image_id_field=getattr(args, "image_id_field", None),
            split_lines=getattr(args, "split_lines", False),
            label_field=getattr(args, "label_field", None),
            precision=args.precision,
            limit=args.limit,
        )
        if args.command == "retrieval":
            from clipforge.eval.retrieval import RetrievalConfig

            cfg = RetrievalConfig(
                ks=_ks(args.k),
                query_block=args.query_block,
                cand_block=args.cand_block,
                device=args.device,
            )
            if cfg.query_block < 1 or cfg.cand_block < 1:
                raise ValueError("--query-block and --cand-block must be >= 1")
            result = run_retrieval(
                args.model,
                args.data,
                info,
                data_cfg,
                cfg,
                args.model_name,
                args.index,
                command,
                query_fields=tuple(args.query_field),
            )
        else:
            from clipforge.eval.zeroshot import ZeroShotConfig

            result = run_zeroshot(
                args.model,
                args.data,
                args.classnames,
                info,
                args.templates,
                data_cfg,
                ZeroShotConfig(
                    ks=_ks(args.k), batch_size=args.batch_size, precision=args.precision
                ),
                args.model_name,
                command,
            )
        if info.is_main:
            print(rep.format_report(result))
            if args.json:
                rep.write_report(args.json, result)
                print(f"results -> {args.json}")
            if getattr(args, "plot", None):
                rep.plot_recall_curves([result], [Path(args.model).name], args.plot)
                print(f"plot -> {args.plot}")
    finally:
        shutdown(info)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from clipforge.eval import report as rep

    first = Path(args.inputs[0])
    if len(args.inputs) == 1 and first.is_dir():
        ks = _ks(args.k) if args.k is not None else None
        rep.plot_training(first, args.out, ks)
    else:
        if args.k is not None:
            raise rep.ReportError("--k applies to a run directory's training curves only")
        reports = [rep.read_report(p) for p in args.inputs]
        rep.plot_recall_curves(reports, [Path(p).stem for p in args.inputs], args.out)
    print(f"plot -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
