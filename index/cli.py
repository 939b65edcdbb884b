"""clipforge-index: embed a collection, build its FAISS index, search and serve it.

The benchmarks against peer tools are not product commands: they live in the repository's
``benchmarks/`` folder (``python -m benchmarks.index_vs_autofaiss``,
``python -m benchmarks.embed_throughput``).

clipforge-index embed  --model runs/tiny --data demo-data --out demo-emb
clipforge-index build  --embeddings demo-emb --out demo-index [--kind auto --target-recall 0.95]
clipforge-index search --index demo-index --text "a red heart" [-k 10] [--json]
clipforge-index serve  --index demo-index [--host 127.0.0.1 --port 8000]
clipforge-index mine   train-emb --out hard-negatives.jsonl [--k 4]   (for data.hard_negatives)
torchrun --nproc-per-node 8 -m clipforge.index embed --model ... --data ... --out ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from clipforge.data_tools.cliutil import part_arg

PROG = "clipforge-index"


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors read ``clipforge-index: error: ...`` in subcommands too
    (argparse would name the subcommand's prog), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _modalities(text: str) -> tuple[str, ...]:
    mods = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in mods if m not in ("image", "text")]
    if not mods or bad:
        raise argparse.ArgumentTypeError(f"expected image, text or image,text; got {text!r}")
    return mods


def _tune_queries(value: str) -> tuple[str, str]:
    modality, eq, path = value.partition("=")
    if not eq or modality not in ("image", "text") or not path:
        raise argparse.ArgumentTypeError(
            f"--tune-queries wants image=PATH.npy or text=PATH.npy, got {value!r}"
        )
    return modality, path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_embed, _add_build, _add_search, _add_serve, _add_loadtest, _add_mine):
        add(sub)
    return parser


def _add_embed(sub: Any) -> None:
    """The ``embed`` subcommand's flags."""
    p = sub.add_parser("embed", help="embed shards into EMB_DIR (image/text .npy + metadata)")
    p.add_argument(
        "--model",
        required=True,
        help="run directory, model/ folder or checkpoint (its exact weights are recorded in "
        "EMB_DIR/model/)",
    )
    p.add_argument("--data", required=True, help="SHARDS: folder, brace pattern, glob, a::b")
    p.add_argument("--out", required=True, help="output EMB_DIR")
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="storage dtype of the embeddings (default: %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="samples per forward pass (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="data-loader processes per rank (default: %(default)s)",
    )
    p.add_argument(
        "--modalities",
        type=_modalities,
        default=("image", "text"),
        help="embeddings to write: image, text or image,text (default: image,text)",
    )
    p.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU if one is visible, else CPU), cpu, cuda, cuda:N (default: %(default)s)",
    )
    p.add_argument(
        "--shards-per-part",
        type=int,
        default=1,
        help="shards per part file, the unit of resume (default: %(default)s)",
    )
    p.add_argument(
        "--model-name",
        help="open_clip model name, only for a bare weights file (default: read from the model)",
    )
    p.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "none"),
        default="auto",
        help="progress display; auto: a bar on a terminal, lines otherwise (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo all parts, even complete ones (default: keep complete parts)",
    )


def _add_build(sub: Any) -> None:
    """The ``build`` subcommand's flags."""
    p = sub.add_parser("build", help="build FAISS indexes from EMB_DIR into INDEX_DIR")
    p.add_argument("--embeddings", required=True, help="EMB_DIR written by embed")
    p.add_argument("--out", required=True, help="output INDEX_DIR")
    p.add_argument(
        "--kind",
        default="auto",
        help="auto, flat, hnsw, ivf_flat, ivf_sqfp16, ivf_sq8, ivf_pq (default: %(default)s)",
    )
    p.add_argument(
        "--memory-budget",
        help="upper bound on the index size, e.g. 4GB, 512MB (default: no bound)",
    )
    p.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 vs exact search to tune nprobe/efSearch for (default: %(default)s)",
    )
    p.add_argument(
        "--modalities", type=_modalities, help="which indexes to build (default: all embedded)"
    )
    p.add_argument(
        "--num-shards",
        type=int,
        help="build IVF kinds in N shards merged into on-disk lists (default: one in-RAM build)",
    )
    split = p.add_mutually_exclusive_group()
    split.add_argument(
        "--part",
        type=part_arg,
        metavar="I/N",
        help="build only part I of N (SLURM array task / rank): part 0 trains the quantizer, the "
        "others wait for it; each adds its share of the ids into OUT/parts/ (default: the whole "
        "build in one process)",
    )
    split.add_argument(
        "--merge-parts",
        action="store_true",
        help="merge the N parts of OUT/parts/ into OUT, the INDEX_DIR a one-machine "
        "--num-shards N build writes (give it the parts' flags; default: no merge)",
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        default=7200.0,
        metavar="S",
        help="with --part I/N, I > 0: seconds to wait for part 0's trained quantizer "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--tune-queries",
        action="append",
        default=[],
        type=_tune_queries,
        metavar="MODALITY=QUERIES.npy",
        help="held-out (Q, D) query vectors to tune that index's recall with, instead of the "
        "other modality's embeddings (repeatable; default: the other modality's embeddings)",
    )
    gpu = p.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None,
                     help="require FAISS GPU (default: the GPU when FAISS sees one)")  # fmt: skip
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false",
                     help="CPU only (default: the GPU when FAISS sees one)")  # fmt: skip


def _add_search(sub: Any) -> None:
    """The ``search`` subcommand's flags."""
    p = sub.add_parser("search", help="query an index by text or image")
    p.add_argument("--index", required=True, help="INDEX_DIR")
    p.add_argument(
        "--text", action="append", default=[], help="text query (repeatable; default: none)"
    )
    p.add_argument(
        "--image",
        action="append",
        default=[],
        help="image file query (repeatable; default: none)",
    )
    p.add_argument("-k", type=int, default=10, help="results per query (default: %(default)s)")
    p.add_argument(
        "--target",
        choices=("image", "text"),
        default="image",
        help="search the image index or the caption index (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        help="query model, checked against the index's model hash (default: the copy of its "
        "model recorded in INDEX_DIR/model/)",
    )
    p.add_argument(
        "--device", default="cpu", help="device of the query model (default: %(default)s)"
    )
    p.add_argument(
        "--json", action="store_true", help="print JSON instead of a table (default: a table)"
    )


def _add_serve(sub: Any) -> None:
    """The ``serve`` subcommand's flags."""
    p = sub.add_parser(
        "serve",
        help="HTTP search API and web page over an index",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--index", required=True, help="INDEX_DIR to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this "
                   "machine only; any other without an API key prints a warning)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--model", help="query model (None: the index's own copy in "
                   "INDEX_DIR/model/)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="device of the query model")
    p.add_argument("--query-encoder", choices=["torch", "onnx", "onnx-int8"], default="torch",
                   help="what encodes text queries: PyTorch, or the exported ONNX text graph "
                   "(fp32, or int8 weights) run by onnxruntime")  # fmt: skip
    p.add_argument("--onnx-export", metavar="DIR", help="with --query-encoder onnx*: the "
                   "clipforge-export onnx directory of the index's model")  # fmt: skip
    p.add_argument("--max-k", type=int, default=1000, help="largest k a request may ask for")
    p.add_argument("--max-batch", type=int, default=64, help="queries encoded per forward pass")
    p.add_argument("--max-upload-mb", type=float, default=10.0,
                   help="largest request body in MiB (an image upload)")  # fmt: skip
    p.add_argument("--max-image-pixels", type=int, default=40_000_000,
                   help="largest uploaded image in pixels (read from its header)")  # fmt: skip
    p.add_argument("--api-key-file", help="file holding the API key that every route but "
                   "/health, the page and the API docs then requires (Authorization: Bearer "
                   "KEY); None: $CLIPFORGE_API_KEY if set, else no key")  # fmt: skip
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="an origin (https://host[:port]) whose pages may call the API; "
                   "repeatable; none: CORS off")  # fmt: skip
    p.add_argument("--max-requests-per-minute", type=int, metavar="N",
                   help="requests one client address may make in any minute (429 beyond); "
                   "None: no limit")  # fmt: skip
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a request may take to send its headers (408)")  # fmt: skip
    p.add_argument("--body-timeout", type=float, default=60.0, metavar="S",
                   help="seconds a search may take to send its body (408)")  # fmt: skip
    p.add_argument("--keep-alive", type=float, default=15.0, metavar="S",
                   help="seconds an idle kept-alive connection stays open")  # fmt: skip
    p.add_argument("--mmap", action="store_true",
                   help="memory-map the index instead of reading it into RAM (indexes larger "
                   "than RAM; resident memory is what searches touch)")  # fmt: skip


def _add_loadtest(sub: Any) -> None:
    """The ``loadtest`` subcommand's flags."""
    # --- loadtest (index/loadtest.py) ---------------------------------------------------------
    p = sub.add_parser(
        "loadtest",
        help="N concurrent text searches: errors, p50/p99, requests/s",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running service")
    where.add_argument("--index", help="INDEX_DIR: start a service for it on a loopback port")
    p.add_argument("--requests", type=int, default=500, help="requests in all")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("-k", type=int, default=10, help="results per search")
    p.add_argument("--target", choices=("image", "text"), default="image",
                   help="search the image index or the caption index")  # fmt: skip
    p.add_argument("--deadline", type=float, default=600.0, help="bound on the run, seconds")
    p.add_argument("--vectors", metavar="NPY",
                   help="a (Q, D) .npy of query embeddings sent in turn as vector queries "
                   "instead of texts (None: the built-in texts)")  # fmt: skip
    p.add_argument("--mmap", action="store_true",
                   help="with --index: the started service memory-maps the index")  # fmt: skip
    p.add_argument("--api-key-file", help="file holding the service's API key, sent as "
                   "Authorization: Bearer KEY (and given to a service the load test starts); "
                   "None: $CLIPFORGE_API_KEY if set, else no key")  # fmt: skip
    p.add_argument("--json", help="also write the figures to this file (None: do not)")


def _add_mine(sub: Any) -> None:
    """``mine``: hard negatives for training (index/mine.py)."""
    p = sub.add_parser(
        "mine",
        help="mine hard negatives (nearest other captions of each image) for training",
        description="For each sample of EMB_DIR (the training shards embedded with the current "
        "model), the K captions nearest its image, its own caption(s) and equal texts excluded, "
        "into a file for training's data.hard_negatives. Exact (chunked brute force): for "
        "training sets up to a few million samples.",
    )
    p.add_argument("emb_dir", metavar="EMB_DIR", help="embeddings directory (image and text)")
    p.add_argument("--out", required=True, metavar="FILE", help="hard-negatives file to write")
    p.add_argument("--k", type=int, default=4, help="negatives per sample (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to score (default: %(default)s)")  # fmt: skip
    p.add_argument("--query-chunk", type=int, default=1024,
                   help="images scored at a time (default: %(default)s)")  # fmt: skip
    p.add_argument("--caption-chunk", type=int, default=8192,
                   help="captions scored at a time (default: %(default)s)")  # fmt: skip


# ----------------------------------------------------------------------------- commands


def _cmd_embed(args: argparse.Namespace) -> int:
    from .embed import EmbedConfig, embed

    config = EmbedConfig(
        model=args.model,
        data=args.data,
        out=args.out,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        modalities=args.modalities,
        device=args.device,
        shards_per_part=args.shards_per_part,
        model_name=args.model_name,
        progress=args.progress,
        overwrite=args.overwrite,
    )
    result = embed(config)
    if result.manifest is not None:
        m = result.manifest
        skipped = sum(m["skipped"].values())
        print(
            f"embedded {m['count']} samples ({', '.join(m['modalities'])}, dim {m['dim']}, "
            f"{m['dtype']}) in {len(m['parts'])} part(s) -> {args.out}; this run"
            f"{' (rank 0)' if result.world_size > 1 else ''}: {len(result.parts_written)} "
            f"part(s) written, {len(result.parts_kept)} kept, {result.samples_per_s:.1f} "
            f"samples/s; skipped {skipped} bad sample(s) in all"
            + (f" {m['skipped']}" if skipped else "")
        )
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import run_build, run_build_part, run_merge_parts
    from .plan import BuildConfig

    common = dict(
        kind=args.kind,
        memory_budget=args.memory_budget,
        target_recall=args.target_recall,
        modalities=args.modalities,
        held_out_queries=dict(args.tune_queries) or None,
        use_gpu=args.use_gpu,
    )
    if args.part is not None:
        i, n = args.part
        done = run_build_part(
            args.embeddings, args.out, i, n, config=BuildConfig(num_shards=args.num_shards),
            wait_timeout_s=args.wait_timeout, **common,
        )  # fmt: skip
        for m, marker in done.markers.items():
            what = "added" if done.built[m] else "complete already, kept"
            print(f"{m}: part {i}/{n}, ids [{marker.start}, {marker.stop}) {what}")
        print(f"part {i}/{n} done; once all {n} are: {PROG} build ... --merge-parts")
        return 0
    if args.merge_parts:
        run_merge_parts(
            args.embeddings, args.out, config=BuildConfig(num_shards=args.num_shards),
            created_by=f"{PROG} build", **common,
        )  # fmt: skip
        return 0
    run_build(
        args.embeddings,
        args.out,
        num_shards=args.num_shards,
        created_by=f"{PROG} build",
        **common,
    )
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from .searcher import Searcher, SearchError

    if not args.text and not args.image:
        raise SearchError("give a query: --text TEXT and/or --image PATH")
    searcher = Searcher.open(args.index, model=args.model, device=args.device)
    results: list[dict[str, Any]] = []
    if args.text:
        for q, hits in zip(
            args.text, searcher.search_text(args.text, args.k, args.target), strict=True
        ):
            results.append({"query": q, "type": "text", "target": args.target, "hits": hits})
    if args.image:
        for q, hits in zip(
            args.image, searcher.search_image(args.image, args.k, args.target), strict=True
        ):
            results.append({"query": q, "type": "image", "target": args.target, "hits": hits})
    if args.json:
        for r in results:
            r["hits"] = [h.to_dict() for h in r["hits"]]
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return 0
    for r in results:
        print(f"{r['type']} query {r['query']!r} -> {r['target']} ({len(r['hits'])} hits)")
        print(f"{'rank':>4}  {'score':>6}  {'key':<14} {'caption':<48} source")
        for rank, h in enumerate(r["hits"], 1):
            caption = h.caption if len(h.caption) <= 48 else h.caption[:45] + "..."
            print(f"{rank:>4}  {h.score:>6.3f}  {h.key:<14} {caption:<48} {h.source}")
        print()
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .http_guard import load_api_key
        from .server import ServerConfig, serve
    except ImportError as e:  # fastapi/uvicorn are only needed by the service
        raise ValueError(f"serve needs the server dependencies (fastapi, uvicorn): {e}") from None
    config = ServerConfig(
        index_dir=args.index,
        model=args.model,
        device=args.device,
        max_k=args.max_k,
        max_batch=args.max_batch,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_image_pixels=args.max_image_pixels,
        api_key=load_api_key(args.api_key_file),
        cors_origins=tuple(args.cors_origin),
        max_requests_per_minute=args.max_requests_per_minute,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        keep_alive_s=args.keep_alive,
        mmap=args.mmap,
        query_encoder=args.query_encoder,
        onnx_export=args.onnx_export,
    )
    serve(config, host=args.host, port=args.port)
    return 0


# --- loadtest (index/loadtest.py) -------------------------------------------------------------


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from .http_guard import load_api_key
    from .loadtest import LoadTestConfig, run_loadtest

    config = LoadTestConfig(
        url=args.url,
        index_dir=args.index,
        api_key=load_api_key(args.api_key_file),
        api_key_file=args.api_key_file,
        requests=args.requests,
        concurrency=args.concurrency,
        k=args.k,
        target=args.target,
        vectors=args.vectors,
        mmap=args.mmap,
        deadline_s=args.deadline,
    )
    result = run_loadtest(config, log=lambda line: print(line, flush=True))
    print(result.summary())
    if args.json:
        from clipforge.data_tools.atomic import write_json_atomic

        figures = {k: v for k, v in vars(result).items() if k != "latencies_ms"}
        figures.update(
            requests_per_s=result.requests_per_s,
            p50_ms=result.percentile(50),
            p99_ms=result.percentile(99),
        )
        write_json_atomic(args.json, figures)
    return 0 if result.errors == 0 and result.not_run == 0 else 1


def _cmd_mine(args: argparse.Namespace) -> int:
    from .mine import MineConfig, mine

    config = MineConfig(
        emb_dir=args.emb_dir,
        out=args.out,
        k=args.k,
        query_chunk=args.query_chunk,
        caption_chunk=args.caption_chunk,
        device=args.device,
    )
    result = mine(config)
    short = f" ({result.without} with fewer: too few other captions)" if result.without else ""
    print(
        f"mined {args.k} hard negatives for {result.samples} samples{short} in "
        f"{result.seconds:.1f} s -> {args.out}"
    )
    return 0


COMMANDS = {
    "embed": _cmd_embed,
    "build": _cmd_build,
    "search": _cmd_search,
    "serve": _cmd_serve,
    "loadtest": _cmd_loadtest,
    "mine": _cmd_mine,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipforge-index``; returns the exit code (2 with a one-line error for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints "PROG: error: ..." and exits 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:
        # Every clipforge input error is a ValueError (EmbedError, SearchError, ShardSpecError,
        # IndexIntegrityError, ConfigError, ...) or an OSError (missing files): one line, no
        # traceback. Anything else is a bug and keeps its traceback.
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
