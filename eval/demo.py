"""``clipforge-demo``: the whole pipeline on the embedded emoji data, on a CPU, in a few minutes.

clipforge-demo                      # -> runs/demo: data, trained model, embeddings, index, R@K
clipforge-demo --out my-demo --serve    # the same, then the web page at http://127.0.0.1:8000/

Stages: write the demo shards -> train the tiny model -> embed the shards -> build the index ->
retrieval Recall@K (exact and through the index) -> example text queries. Every stage keeps
what a previous run completed: shards with the right checksums stay, training resumes from its
newest checkpoint (and is skipped when it reached the step count), complete embedding parts are
kept, an index built from the current embeddings is reused, and so is an evaluation of the
current model. Re-running after an interruption therefore continues where it stopped.

The demo lives in ``eval`` because it uses every subsystem (eval may import index, pretrain and
data_tools; none of them may import eval).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipforge.pretrain.models import LoadedModel

PROG = "clipforge-demo"

EXAMPLE_QUERIES: tuple[str, ...] = (
    "a red heart",
    "cat face",
    "pizza",
    "flag of Japan",
    "smiling face with sunglasses",
    "rocket",
)
"""Text queries the demo runs against its index (fixed before the recipe was tuned)."""

FREE_FORM_QUERIES: tuple[str, ...] = (
    "something to drink",
    "bad weather",
    "a happy animal",
)
"""Queries that are no emoji's name: printed as what comes back, good or bad (the model was
trained on names and tags only, so these show how far that carries)."""

NAME_FIELD = "name"
"""The field of each demo sample's .json holding the emoji's name ("cat face"): the training
captions' leading part, and the query of the name-only evaluation."""


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run (``clipforge-demo`` flags map onto these)."""

    out: str = "runs/demo"
    """Run directory holding every stage's output: data/, run/, embeddings/, index/,
    retrieval.json."""
    steps: int = 1200
    """Training steps. 1,200 steps of 128 (153,600 samples: 82 s of training on 2 idle CPU
    cores) reach, querying by each emoji's name alone, R@1 0.914 and R@10 0.998; 1,000 steps
    gave 0.870 / 0.996 (the README's demo section has the table of the recipes tried)."""
    batch_size: int = 128
    """Training batch size (contrastive: every other sample in the batch is a negative). 256
    with half the steps did worse (name R@1 0.70 against 0.77): steps count more than negatives
    here."""
    lr: float = 2e-3
    """Peak learning rate of the cosine schedule (4e-3 was far behind: loss 3.2 against 1.3 at
    step 420)."""
    caption_subsets: float = 0.3
    """Share of training captions ("name, tag, tag") replaced by a random subset of their parts
    (the name one part), so that short free-form queries ("cat face") are in distribution."""
    caption_name_only: float = 0.5
    """Share of training captions replaced by the emoji's name alone: the query the demo is
    judged by, which subsets alone show rarely (``caption_subsets + caption_name_only`` <= 1;
    the rest stay as written)."""
    augment: bool = False
    """Random-resized-crop the training images. Off: the demo's index holds the very images it
    trains on, so what helps is learning each one exactly (name R@1 0.77 -> 0.87)."""
    warmup_fraction: float = 0.01
    """Learning-rate warmup as a share of ``steps`` (at least one step), so that the warmup
    scales with the run length."""
    init_logit_scale: float = 3.912
    """Initial log inverse temperature of the contrastive loss: ln(50), temperature 0.02 (CLIP
    starts at 0.07, which a 2-minute run does not get far from: name R@1 0.755 -> 0.766; 0.01,
    with more bare names, fell to 0.64)."""
    checkpoint_every: int = 100
    """Steps between checkpoints: an interrupted run loses at most this many steps."""
    extend_schedule: str = ""
    """How a finished (or started) demo run continues when ``steps`` changes: "" refuses (the
    learning-rate schedule would jump), "rewarm" warms up again from the current rate and decays
    to the new end, "continue_lr" decays from the current rate to the new end
    (pretrain's ``train.extend_schedule``)."""
    workers: int = 2
    """Data-loader processes for embedding and evaluation (training keeps the recipe's loader:
    the tiny preset's one worker, so that its data order, and the model, are the recipe's)."""
    ks: tuple[int, ...] = (1, 5, 10)
    """The K of Recall@K."""
    queries: tuple[str, ...] = EXAMPLE_QUERIES
    """Example text queries."""
    free_form_queries: tuple[str, ...] = FREE_FORM_QUERIES
    """Queries that are no emoji's name, printed apart as such."""
    top: int = 5
    """Hits printed per example query."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.extend_schedule not in ("", "rewarm", "continue_lr"):
            raise ValueError(
                f"extend_schedule must be rewarm or continue_lr, got {self.extend_schedule!r}"
            )
        if self.top < 1:
            raise ValueError(f"top must be >= 1, got {self.top}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")

    @property
    def warmup_steps(self) -> int:
        """``warmup_fraction`` of ``steps``, at least 1."""
        return max(1, round(self.warmup_fraction * self.steps))


@dataclass
class DemoResult:
    """What a demo run produced."""

    out: Path
    """The run directory."""
    data_dir: Path
    """The demo shards."""
    run_dir: Path
    """The training run (``model/`` inside it is the exported open_clip model)."""
    embeddings_dir: Path
    """EMB_DIR."""
    index_dir: Path
    """INDEX_DIR."""
    retrieval: dict[str, Any]
    """The retrieval report (clipforge.eval's result object)."""
    examples: dict[str, list[Any]]
    """Example query -> its top hits (:class:`clipforge.index.searcher.Hit`)."""
    reused: dict[str, bool] = field(default_factory=dict)
    """Stage -> whether a previous run's output was reused."""


def _training_done(run_dir: Path, steps: int) -> bool:
    """A finished run: exported model and a checkpoint at (or past) ``steps``."""
    from clipforge.pretrain.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    exported = (run_dir / "model" / "open_clip_config.json").is_file()
    return exported and bool(found) and found[-1][0] >= steps


def _planned_steps(run_dir: Path) -> int | None:
    """The ``train.steps`` an earlier demo run was started with (its config.yaml), if any."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        return int(saved["train"]["steps"])
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError):
        return None


def _check_extension(run_dir: Path, config: DemoConfig) -> None:
    """Refuse, in the demo's own flags, a change of ``--steps`` that would bend the schedule.

    pretrain refuses it too, but its message names ``--set train.extend_schedule``, which the
    demo's command line does not take.
    """
    from clipforge.pretrain.checkpoint import list_checkpoints

    planned = _planned_steps(run_dir)
    if (
        planned is None
        or planned == config.steps
        or config.extend_schedule
        or not list_checkpoints(run_dir / "checkpoints")
    ):
        return
    raise ValueError(
        f"{run_dir} was started as a {planned}-step run; --steps {config.steps} changes its "
        "learning-rate schedule: add --extend-schedule rewarm (warm up again from the current "
        "rate, then decay to the new end) or --extend-schedule continue_lr (decay from the "
        "current rate to the new end), or use another --out"
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage's output lives inside the demo's run directory."""

    out: Path
    """The run directory (absolute)."""
    data: Path
    """The demo shards."""
    run: Path
    """The training run."""
    embeddings: Path
    """EMB_DIR."""
    index: Path
    """INDEX_DIR."""
    report: Path
    """The retrieval report (retrieval.json)."""

    @classmethod
    def under(cls, out: str | Path) -> DemoPaths:
        root = Path(out).resolve()
        return cls(
            root,
            root / "data",
            root / "run",
            root / "embeddings",
            root / "index",
            root / "retrieval.json",
        )


class _StageLog:
    """The demo's printed progress: a numbered header per stage, an indented line when done."""

    def __init__(self, log: Callable[[str], None], stages: int = 6) -> None:
        self.log = log
        self.stages = stages

    def start(self, n: int, title: str) -> float:
        self.log(f"\n[{n}/{self.stages}] {title}")
        return time.perf_counter()

    def detail(self, line: str) -> None:
        self.log(f"      {line}")

    def done(self, t0: float, what: str) -> None:
        self.detail(f"{what} ({time.perf_counter() - t0:.1f} s)")


def _write_shards(paths: DemoPaths, stages: _StageLog) -> None:
    """Stage 1: the embedded emoji set as shards (kept when their checksums match)."""
    from clipforge.data_tools.demo import write_demo_shards

    t0 = stages.start(1, "demo data: the embedded emoji dataset as webdataset shards")
    manifest = write_demo_shards(paths.data)
    samples = sum(s.samples for s in manifest.shards)
    stages.done(t0, f"{samples} samples in {len(manifest.shards)} shards -> {paths.data}")


def recipe_overrides(config: DemoConfig, train_data: str | os.PathLike[str]) -> list[str]:
    """pretrain's ``--set`` overrides of the tiny preset that make the demo's training recipe
    (batch, learning rate and warmup, caption policy, augmentation, starting temperature);
    benchmarks.generalisation trains with the same recipe."""
    return [
        f"data.train={train_data}",
        f"data.batch_size={config.batch_size}",
        f"optim.lr={config.lr}",
        f"optim.warmup_steps={config.warmup_steps}",
        f"data.caption_subsets={config.caption_subsets}",
        f"data.augment={str(config.augment).lower()}",
        f"data.caption_name_only={config.caption_name_only}",
        f"data.caption_name_field={NAME_FIELD}",
        f"loss.init_logit_scale={config.init_logit_scale}",
    ]


def _train_overrides(config: DemoConfig, paths: DemoPaths) -> list[str]:
    """pretrain's ``--set`` overrides of the tiny preset for the demo's run: its recipe, length
    and run directory."""
    overrides = [
        *recipe_overrides(config, paths.data),
        f"train.steps={config.steps}",
        f"train.run_dir={paths.run}",
        f"train.log_every={max(1, min(20, config.steps // 10))}",
        f"train.checkpoint_every={config.checkpoint_every}",
        "train.device=cpu",
        # a bar on a terminal, a line per log_every steps otherwise
        "train.progress=auto",
    ]
    if config.extend_schedule:
        overrides.append(f"train.extend_schedule={config.extend_schedule}")
    return overrides


def _train(config: DemoConfig, paths: DemoPaths, stages: _StageLog) -> bool:
    """Stage 2: train (or resume) the tiny model; True when a finished run was reused."""
    from clipforge.pretrain.config import load_config
    from clipforge.pretrain.train import train

    t0 = stages.start(
        2, f"training the tiny CLIP model: {config.steps} steps of {config.batch_size}"
    )
    if _training_done(paths.run, config.steps):
        stages.done(t0, f"already trained: reusing {paths.run / 'model'}")
        return True
    _check_extension(paths.run, config)
    result = train(load_config("tiny", _train_overrides(config, paths)))
    model_dir = paths.run / "model"
    stages.done(t0, f"trained to step {result.steps}, loss {result.last_loss:.3f} -> {model_dir}")
    return False


def _embed(
    config: DemoConfig, paths: DemoPaths, loaded: LoadedModel, stages: _StageLog
) -> tuple[dict[str, Any], bool]:
    """Stage 3: embed every image and caption; (the EMB_DIR manifest, whether every part was
    already there). Parts embedded by an earlier model (training continued since) are redone."""
    from clipforge.index.embed import EmbedConfig, embed

    t0 = stages.start(3, "embedding every image and caption with the trained model")
    emb = paths.embeddings
    emb_manifest = _read_json(emb / "embeddings.json")
    stale = emb_manifest is not None and emb_manifest.get("model_hash") != loaded.model_hash
    embedded = embed(
        EmbedConfig(
            model=str(paths.run),
            data=str(paths.data),
            out=str(emb),
            batch_size=256,
            workers=config.workers,
            device="cpu",
            overwrite=stale,
        )
    )
    m = embedded.manifest or {}
    stages.done(
        t0,
        f"{m.get('count', '?')} samples, dim {m.get('dim', '?')}: "
        f"{len(embedded.parts_written)} part(s) embedded, {len(embedded.parts_kept)} kept -> {emb}",
    )
    return m, not embedded.parts_written


def _build_index(
    paths: DemoPaths, manifest: dict[str, Any], embeddings_reused: bool, stages: _StageLog
) -> tuple[dict[str, Any], bool]:
    """Stage 4: build the index, or reuse the one built from these very embeddings; (its
    index.json, whether it was reused)."""
    from clipforge.index.build import run_build

    t0 = stages.start(4, "building the FAISS index (kind chosen for the collection size)")
    current = _read_json(paths.index / "index.json")
    if (
        current is not None
        and current.get("model_hash") == manifest.get("model_hash")
        and current.get("count") == manifest.get("count")
        and embeddings_reused
    ):
        built, reused = current, True
        stages.done(t0, f"index of the current embeddings exists: reusing {paths.index}")
    else:
        built = run_build(
            paths.embeddings, paths.index, kind="auto", created_by=PROG, log=stages.detail
        )
        reused = False
        stages.done(t0, f"built -> {paths.index}")
    kinds = ", ".join(f"{mod}: {info.get('kind')}" for mod, info in built["modalities"].items())
    stages.detail(f"{built['count']} items, dim {built['dim']} ({kinds})")
    return built, reused


def _evaluate(
    config: DemoConfig, paths: DemoPaths, loaded: LoadedModel, index_reused: bool, stages: _StageLog
) -> tuple[dict[str, Any], bool]:
    """Stage 5: retrieval Recall@K, exact and through the index; (the report, whether the one
    of this model and this index was reused)."""
    from clipforge.eval.data import EvalDataConfig
    from clipforge.eval.report import format_retrieval, write_report
    from clipforge.eval.retrieval import RetrievalConfig, field_query_direction
    from clipforge.eval.tasks import run_retrieval, setup
    from clipforge.pretrain.distributed import shutdown

    t0 = stages.start(
        5, "retrieval Recall@K on the demo set (clipforge.eval: exact and via the index)"
    )
    report = _read_json(paths.report)
    reused = (
        report is not None
        and report.get("model", {}).get("hash") == loaded.model_hash
        and report.get("metrics", {}).get("index", {}).get("dir") == str(paths.index)
        and report.get("config", {}).get("query_fields") == [NAME_FIELD]
        and index_reused
    )
    if not reused:
        info = setup("cpu")
        try:
            report = run_retrieval(
                loaded,
                str(paths.data),
                info,
                EvalDataConfig(workers=config.workers),
                RetrievalConfig(ks=config.ks, device="cpu"),
                index_dir=str(paths.index),
                command=[PROG, "--out", str(paths.out)],
                query_fields=(NAME_FIELD,),
            )
        finally:
            shutdown(info)
        write_report(paths.report, report)
    assert report is not None
    for line in format_retrieval(report["metrics"]).splitlines():
        stages.detail(line)
    names = report["metrics"]["exact"][field_query_direction(NAME_FIELD)]
    stages.detail(
        f"querying by the emoji's name alone ({names['queries']} names against every image): "
        f"R@1 {names['R@1']:.3f}, R@10 {names['R@10']:.3f}"
        if "R@1" in names and "R@10" in names
        else f"querying by the emoji's name alone: {names['queries']} names (rows above)"
    )
    stages.done(t0, ("reused " if reused else "") + f"report -> {paths.report}")
    return report, reused


def _print_hits(stages: _StageLog, queries: Sequence[str], found: list[list[Any]]) -> None:
    for query, hits in zip(queries, found, strict=True):
        stages.detail(f'"{query}"')
        for rank, h in enumerate(hits, 1):
            stages.log(f"        {rank}. {h.score:.3f}  {h.caption}")


def _run_queries(
    config: DemoConfig, paths: DemoPaths, loaded: LoadedModel, count: int, stages: _StageLog
) -> dict[str, list[Any]]:
    """Stage 6: the example text queries against the image index, their top hits printed; then
    the free-form queries (no emoji's name), printed apart so they are not taken for names."""
    from clipforge.index.searcher import Searcher

    t0 = stages.start(6, f"example text queries (top {config.top} of {count} images)")
    searcher = Searcher.open(paths.index, model=loaded)
    queries = [*config.queries, *config.free_form_queries]
    found = searcher.search_text(queries, k=config.top, target="image") if queries else []
    examples = dict(zip(queries, found, strict=True))
    _print_hits(stages, config.queries, found[: len(config.queries)])
    if config.free_form_queries:
        stages.detail(
            "free-form queries: no emoji is named like this (the model learned names and tags); "
            "what comes back, as it is:"
        )
        _print_hits(stages, config.free_form_queries, found[len(config.queries) :])
    stages.done(t0, "searched")
    return examples


def run_demo(config: DemoConfig, log: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) every stage of the demo; prints progress through ``log``."""
    from clipforge.pretrain.models import load_model

    paths = DemoPaths.under(config.out)
    stages = _StageLog(log)
    reused: dict[str, bool] = {}
    t_all = time.perf_counter()
    log(f"clipforge demo: run directory {paths.out}")
    _write_shards(paths, stages)
    reused["train"] = _train(config, paths, stages)
    loaded = load_model(paths.run)
    manifest, reused["embed"] = _embed(config, paths, loaded, stages)
    built, reused["index"] = _build_index(paths, manifest, reused["embed"], stages)
    report, reused["eval"] = _evaluate(config, paths, loaded, reused["index"], stages)
    examples = _run_queries(config, paths, loaded, built["count"], stages)
    log(f"\ndone in {time.perf_counter() - t_all:.0f} s. Everything is in {paths.out}")
    return DemoResult(
        paths.out,
        paths.data,
        paths.run,
        paths.embeddings,
        paths.index,
        report,
        examples,
        reused,
    )


def _serve(result: DemoResult, out_flag: str, serve: bool, host: str, port: int) -> None:
    """Print how to open the web page, or (``serve``) serve it until Ctrl-C."""
    if not serve:
        index = os.path.relpath(result.index_dir)
        if index.startswith(".."):  # outside the working directory: the full path reads better
            index = str(result.index_dir)
        print(
            f"\nOpen the web page: clipforge-index serve --index {index}\n"
            f"  then browse http://127.0.0.1:8000/  (or: {PROG} --out {out_flag} --serve)"
        )
        return
    from clipforge.index.server import ServerConfig
    from clipforge.index.server import serve as serve_index

    print()
    serve_index(ServerConfig(str(result.index_dir), model=str(result.run_dir)), host, port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:5]),
    )
    d = DemoConfig()
    parser.add_argument("--out", default=d.out, help=f"run directory (default {d.out})")
    parser.add_argument(
        "--serve", action="store_true", help="then serve the web page and API (Ctrl-C stops)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="with --serve (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="with --serve (default 8000)")
    parser.add_argument(
        "--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})"
    )
    parser.add_argument(
        "--extend-schedule",
        choices=("rewarm", "continue_lr"),
        default=None,
        help="when --steps changes an earlier run's length: warm up again (rewarm) or decay "
        "from the current rate (continue_lr) to the new end (default: refuse)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help=f"data-loader processes (embed, eval) (default {d.workers})",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``clipforge-demo``; returns the exit code (2 with a one-line error for bad input)."""
    args = build_parser().parse_args(argv)
    from clipforge.pretrain.train import TrainingAborted

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    try:
        config = DemoConfig(
            out=args.out,
            steps=args.steps,
            workers=args.workers,
            extend_schedule=args.extend_schedule or "",
        )
        result = run_demo(config, log=lambda line: print(line, flush=True))
        _serve(result, args.out, args.serve, args.host, args.port)
        return 0
    except (ValueError, OSError) as e:
        # clipforge's input errors are ValueErrors (ConfigError, EmbedError, SearchError, ...)
        # or OSErrors (missing files, a port in use): one line, no traceback.
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"{PROG}: training aborted: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
