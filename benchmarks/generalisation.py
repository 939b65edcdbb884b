"""Generalisation to an unseen drawing style, side by side with open_clip_train.

    python -m benchmarks.generalisation fetch            # npm pack the twemoji images (once)
    python -m benchmarks.generalisation run --seconds 120 --steps 800 --seeds 0,1,2 \\
        [--peer-python VENV/bin/python | --no-peer] [--settings time,steps] [--json OUT]
    python -m benchmarks.generalisation ablate --steps 400 --seeds 0,1,2 [--variants a,b]

Both tools train the same model (clipforge's demo model, ``clipforge-tiny``) on the same shards:
Google's Noto emoji, the demo dataset clipforge ships. Both are then scored on *Twitter's*
twemoji drawings of the same emoji (matched by unified codepoint), which neither saw: text ->
image and image -> text Recall@1/5/10 with each emoji's name as its caption (every name queries
all images, and each image all names), and zero-shot classification of the images into the
emoji categories (emoji-datasource's "Smileys & Emotion", "Flags", ...) with clipforge-eval's
default prompt templates. The same name queries on the Noto images give the in-style figure for
reference. Every figure comes from clipforge's own eval code; open_clip_train's checkpoint is
loaded into the same evaluation.

* clipforge trains with its default recipe for the demo model: the ``tiny`` preset with
  ``clipforge-demo``'s batch size, learning rate, warmup, caption policy and temperature
  (``DemoConfig``), and the presets' random crop (``TRANSFER_OVERRIDES``; the demo alone turns
  it off). ``ablate`` measures the recipe's parts one at a time.
* open_clip_train trains with *its* defaults (batch 64, lr 5e-4, weight decay 0.2, 10,000 warmup
  steps, AdamW betas/eps as it picks them from the model name) through
  ``peer_open_clip_generalisation.py``; ``--peer-clipforge-recipe`` adds a row of
  open_clip_train given clipforge's batch, lr, weight decay and warmup (not its caption
  subsets, which open_clip_train has no equivalent of).

What is held equal is the machine: device, fp32, one data worker, the threads. Two settings:
``time``, equal wall-clock (each tool's step count is sized from two timing runs of its own, a
line through their steps and seconds, so that its run, set-up and checkpoint included, takes
``--seconds``; the schedule then ends at the last step,
and the run's real seconds are reported), and ``steps``, equal optimizer steps (``--steps``).
The twemoji images are CC-BY-4.0: they are fetched into ``--cache`` (git-ignored ``runs/``),
never shipped, and the test shards built from them carry the licence NOTICE.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from benchmarks.peer_python import OPEN_CLIP_TRAIN, PeerError, peer_env, peer_python
from clipforge.data_tools.atomic import write_json_atomic
from clipforge.data_tools.demo import write_demo_shards
from clipforge.data_tools.reader import ShardSpecError, parse_shard_spec
from clipforge.data_tools.writer import WriteConfig, write_shards
from clipforge.eval.data import EvalDataConfig, EvalDataError, embed_eval_set
from clipforge.eval.demo import DemoConfig, recipe_overrides
from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval
from clipforge.eval.tasks import setup
from clipforge.eval.zeroshot import build_classifier, evaluate_zeroshot, load_templates
from clipforge.pretrain.config import Config, ConfigError, load_config
from clipforge.pretrain.distributed import DistInfo, shutdown
from clipforge.pretrain.models import LoadedModel, load_model, resolve_model_config
from clipforge.pretrain.train import TrainingAborted, train

PROG = "benchmarks.generalisation"
PEER_SCRIPT = Path(__file__).with_name("peer_open_clip_generalisation.py")
TWITTER_PACKAGE = "emoji-datasource-twitter@16.0.0"
"""The npm package holding the twemoji 64-px PNGs and their emoji.json."""
TWITTER_TGZ = "emoji-datasource-twitter-16.0.0.tgz"
"""The file ``npm pack TWITTER_PACKAGE`` writes."""
DEFAULT_WORK = "runs/generalisation"
DEFAULT_CACHE = "runs/generalisation/npm"
KS = (1, 5, 10)
TIMING_STEPS = 30
"""Steps of the shorter of the two runs that time each tool before an equal-wall-clock run."""
TIMING_LONG_FACTOR = 5
"""The longer timing run has this many times TIMING_STEPS' steps."""
TIMING_EXCLUDED = 5
"""First steps of the timing run left out of its median step time."""

TWEMOJI_NOTICE = """Twemoji test images for benchmarks/generalisation.py

Images: Twemoji, Copyright 2019 Twitter, Inc and other contributors (https://github.com/jdecked/twemoji),
graphics licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/), from the npm
package {package} (https://github.com/iamcal/emoji-data). Changes: the 64x64 PNGs were
alpha-composited onto white and re-encoded as WebP (quality 90) by benchmarks/generalisation.py.
These images are a local test set: they are not part of clipforge and not in its repository.

Names and categories: those of clipforge's emoji demo dataset (emoji-datasource, MIT, and
emojibase-data, MIT; see the demo dataset's NOTICE), matched to the images by unified codepoint.

----- {package} LICENSE (emoji data and code) -----
{license}"""


class BenchmarkError(ValueError):
    """The benchmark cannot run as asked (the message says why and what to do)."""


# ----------------------------------------------------------------------------- data


def fetch(cache: Path) -> Path:
    """``npm pack`` the twemoji package into ``cache`` (kept when already there); its path."""
    target = cache / TWITTER_TGZ
    if target.is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise BenchmarkError(
            f"npm is not installed: install Node.js's npm, or copy {TWITTER_TGZ} (npm pack "
            f"{TWITTER_PACKAGE} on a machine with npm) into {cache}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [npm, "pack", TWITTER_PACKAGE, "--pack-destination", str(cache)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not target.is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchmarkError(f"npm pack {TWITTER_PACKAGE} failed (exit {proc.returncode}): {last}")
    return target


@dataclass(frozen=True)
class TrainSample:
    """One sample of the training shards, as the test sets need it."""

    key: str
    """The sample's key in its shard."""
    image: bytes
    """The stored image bytes."""
    suffix: str
    """The image member's extension (``webp``, ``png``, ``jpg``)."""
    name: str
    """The emoji's name (the .json's ``name``): the caption of both test sets."""
    unified: str
    """Unified codepoint(s) (``1F600``): how the other style's image is found."""
    category: str
    """The emoji category: the zero-shot label."""


def read_train_samples(train_dir: Path) -> list[TrainSample]:
    """Every sample of the training shards (``*.tar`` of the folder, name order) that names
    its emoji; a shard or sample that cannot be used fails with its name."""
    shards = sorted(train_dir.glob("*.tar"))
    if not shards:
        raise BenchmarkError(f"{train_dir}: no *.tar training shards")
    out: list[TrainSample] = []
    for shard in shards:
        members: dict[str, dict[str, bytes]] = {}
        try:
            with tarfile.open(shard) as tar:
                for m in tar:
                    f = tar.extractfile(m) if m.isfile() else None
                    if f is None:
                        continue
                    key, _, ext = m.name.rpartition("/")[2].partition(".")
                    members.setdefault(key, {})[ext] = f.read()
        except (OSError, tarfile.TarError) as e:
            raise BenchmarkError(f"{shard}: not a readable shard ({e})") from None
        for key, parts in members.items():
            suffix = next((e for e in ("webp", "png", "jpg", "jpeg") if e in parts), None)
            if suffix is None or "json" not in parts:
                raise BenchmarkError(f"{shard}: sample {key} has no image or no .json")
            meta = json.loads(parts["json"])
            missing = [f for f in ("name", "unified", "category") if not meta.get(f)]
            if missing:
                raise BenchmarkError(
                    f"{shard}: sample {key}'s .json has no {', '.join(missing)} (the test sets "
                    f"need each emoji's name, unified codepoint and category)"
                )
            out.append(
                TrainSample(
                    key, parts[suffix], suffix, meta["name"], meta["unified"], meta["category"]
                )
            )
    return out


def _twitter_images(package: Path) -> dict[str, Path]:
    """Unified codepoint -> twemoji 64-px PNG, for every emoji with a Twitter image."""
    try:
        emoji = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"{TWITTER_TGZ}: no readable package/emoji.json ({e})") from None
    out = {}
    for e in emoji:
        image = package / "img" / "twitter" / "64" / str(e.get("image", ""))
        if e.get("has_img_twitter") and image.is_file():
            out[str(e["unified"]).upper()] = image
    return out


@dataclass(frozen=True)
class TestSets:
    """The two evaluation sets: the same emoji, names and categories, in two styles."""

    twemoji: Path
    """Twemoji images, caption = the name (the unseen style)."""
    noto: Path
    """The training images, caption = the name (the training style, for reference)."""
    emoji: int
    """Emoji in each set."""
    without_twemoji: int
    """Training emoji left out because twemoji has no image of them."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_test_sets(train_dir: Path, twitter_tgz: Path, out: Path) -> TestSets:
    """Write the twemoji and Noto name-caption test sets into ``out`` through clipforge's
    writer (kept when built from the same inputs). Rows follow the training shards' order."""
    if not twitter_tgz.is_file():
        raise BenchmarkError(
            f"no {twitter_tgz}: run `python -m {PROG} fetch --cache {twitter_tgz.parent}` first "
            f"(npm pack {TWITTER_PACKAGE})"
        )
    samples = read_train_samples(train_dir)
    inputs = {
        "train": [(s.key, hashlib.sha256(s.image).hexdigest()[:16]) for s in samples],
        "twitter_tgz_sha256": _sha256(twitter_tgz),
    }
    stamp = hashlib.sha256(json.dumps(inputs).encode()).hexdigest()[:16]
    built = out / "build.json"
    try:
        previous = json.loads(built.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("stamp") == stamp:
        return TestSets(
            out / "twemoji-names",
            out / "noto-names",
            int(previous["emoji"]),
            int(previous["without_twemoji"]),
        )
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".build-") as tmp_str:
        tmp = Path(tmp_str)
        try:
            with tarfile.open(twitter_tgz) as tar:
                # the table, the licence and the 64-px images (not the sprite sheets: 4x more)
                wanted = [
                    m
                    for m in tar.getmembers()
                    if m.name in ("package/emoji.json", "package/LICENSE")
                    or m.name.startswith("package/img/twitter/64/")
                ]
                tar.extractall(tmp / "npm", members=wanted, filter="data")
        except (OSError, tarfile.TarError) as e:
            raise BenchmarkError(f"{twitter_tgz}: not a readable npm tarball ({e})") from None
        package = tmp / "npm" / "package"
        twitter = _twitter_images(package)
        kept = [s for s in samples if s.unified.upper() in twitter]
        if not kept:
            raise BenchmarkError(
                f"{twitter_tgz}: none of the {len(samples)} training emoji has a twemoji image"
            )
        noto_rows, twemoji_rows = [], []
        (tmp / "noto").mkdir()
        for i, s in enumerate(kept):
            # The training pixels themselves, decoded once and stored losslessly (PNG, no
            # resize): the in-style set differs from training only in its captions.
            noto_png = tmp / "noto" / f"{i:06d}.png"
            with Image.open(io.BytesIO(s.image)) as img:
                img.save(noto_png)
            common = {
                "caption": s.name,
                "name": s.name,
                "unified": s.unified,
                "category": s.category,
            }
            # paths relative to the tables' folder: the .json's "source" names no temp dir
            noto_rows.append({"image": noto_png.relative_to(tmp).as_posix(), **common})
            twemoji_rows.append(
                {"image": twitter[s.unified.upper()].relative_to(tmp).as_posix(), **common}
            )
        staged = tmp / "staged"
        for name, rows, cfg in (
            ("noto-names", noto_rows, WriteConfig(resize_mode="none", image_format="png")),
            # as the demo's Noto images were made: 64 px, composited onto white, WebP q90
            (
                "twemoji-names",
                twemoji_rows,
                WriteConfig(image_size=64, resize_mode="center_crop", image_format="webp"),
            ),
        ):
            table = tmp / f"{name}.jsonl"
            table.write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
            )
            cfg = replace(cfg, quality=90, shard_size=500, prefix=name, workers=1)
            result = write_shards(table, staged / name, cfg, progress=False)
            if result.stats["failed"]:
                raise BenchmarkError(
                    f"{name}: the writer skipped inputs: {result.stats['failures']}"
                )
        (staged / "twemoji-names" / "NOTICE").write_text(
            TWEMOJI_NOTICE.format(
                package=TWITTER_PACKAGE,
                license=(package / "LICENSE").read_text(encoding="utf-8"),
            ),
            encoding="utf-8",
        )
        for name in ("noto-names", "twemoji-names"):
            if (out / name).exists():
                shutil.rmtree(out / name)
            os.replace(staged / name, out / name)
    write_json_atomic(
        built,
        {"stamp": stamp, "emoji": len(kept), "without_twemoji": len(samples) - len(kept)},
    )
    return TestSets(out / "twemoji-names", out / "noto-names", len(kept), len(samples) - len(kept))


# ----------------------------------------------------------------------------- training


TRANSFER_OVERRIDES = ("data.augment=true",)
"""What ``run`` adds to the demo's recipe: the random-resized-crop that every preset trains with
and the demo turns off (it tunes for names on its own drawings). The ablation's ``crop``
variant: +0.08 to +0.12 twemoji text->image R@10 on each of three seeds (0.289 vs 0.170,
0.272 vs 0.150, 0.240 vs 0.164 at 600 steps), for -0.02 to -0.07 on the training style."""


def clipforge_recipe(train_data: Path, extra: Sequence[str] = ()) -> Config:
    """clipforge's default recipe for the demo model: the ``tiny`` preset with
    ``clipforge-demo``'s recipe (``eval.demo.recipe_overrides``: batch, learning rate and
    warmup, caption policy, augmentation, starting temperature)."""
    return load_config("tiny", [*recipe_overrides(DemoConfig(), train_data), *extra])


def _run_config(recipe: Config, run_dir: Path, steps: int, seed: int, log_every: int) -> Config:
    return replace(
        recipe,
        train=replace(
            recipe.train,
            run_dir=str(run_dir),
            steps=steps,
            seed=seed,
            resume=False,
            log_every=log_every,
            checkpoint_every=steps,  # one checkpoint, at the end (as the peer's one save)
            progress="lines",
        ),
    )


@dataclass(frozen=True)
class Trained:
    """One finished training run."""

    model: Path
    """What :func:`load_model` loads (a run directory or a checkpoint)."""
    steps: int
    """Optimizer steps done."""
    batch_size: int
    """Samples per step."""
    train_seconds: float
    """Wall-clock of the training call: set-up, the steps, the checkpoint/export."""
    samples_per_s: float
    """Median samples/s over the steps after the first TIMING_EXCLUDED."""
    last_loss: float
    """Loss at the last step."""
    hyper: dict[str, Any]
    """The recipe's hyperparameters (batch, lr, weight decay, warmup, betas, eps)."""


def train_clipforge(recipe: Config, run_dir: Path, steps: int, seed: int) -> Trained:
    """Train clipforge's recipe for ``steps`` steps into ``run_dir`` (replaced)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = _run_config(recipe, run_dir, steps, seed, log_every=1)
    t0 = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - t0
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > TIMING_EXCLUDED] or records
    o = config.optim
    return Trained(
        run_dir,
        result.steps,
        config.data.batch_size,
        round(seconds, 2),
        round(statistics.median(r["samples_per_s"] for r in timed), 2),
        round(result.last_loss, 4),
        {
            "batch_size": config.data.batch_size,
            "lr": o.lr,
            "wd": o.weight_decay,
            "warmup": o.warmup_steps,
            "beta1": o.beta1,
            "beta2": o.beta2,
            "eps": o.eps,
            "caption_subsets": config.data.caption_subsets,
        },
    )


@dataclass(frozen=True)
class PeerRecipe:
    """open_clip_train's settings for one row: None = open_clip_train's own default."""

    label: str
    """The row's name in the table."""
    batch_size: int | None = None
    """``--batch-size``."""
    lr: float | None = None
    """``--lr``."""
    wd: float | None = None
    """``--wd``."""
    warmup: int | None = None
    """``--warmup`` (steps)."""


def train_peer(
    python: str,
    recipe: Config,
    peer: PeerRecipe,
    logs: Path,
    steps: int,
    seed: int,
) -> Trained:
    """open_clip_train for ``steps`` steps on ``recipe``'s data and model; its checkpoint is
    under ``logs`` (replaced)."""
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    model_name, model_cfg = resolve_model_config(recipe.model.name)
    cfg_path = logs / f"{Path(model_name).stem}.json"
    cfg_path.write_text(json.dumps(model_cfg))
    urls = parse_shard_spec(recipe.data.train)[0].urls
    cmd = [
        python,
        "-P",  # keep the repository off the peer's sys.path
        str(PEER_SCRIPT),
        "--model-config", str(cfg_path),
        "--train-data", "::".join(urls),
        "--steps", str(steps),
        "--seed", str(seed),
        "--workers", str(recipe.data.workers),
        "--precision", {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[recipe.train.precision],
        "--threads", str(torch.get_num_threads()),
        "--logs", str(logs / "open_clip_train"),
        "--warmup-steps-excluded", str(TIMING_EXCLUDED),
    ]  # fmt: skip
    for flag, value in (
        ("--batch-size", peer.batch_size),
        ("--lr", peer.lr),
        ("--wd", peer.wd),
        ("--warmup", peer.warmup),
    ):
        if value is not None:
            cmd += [flag, str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), check=False)
    if proc.returncode != 0:
        raise BenchmarkError(
            f"open_clip_train failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    hyper = {k: got[k] for k in ("batch_size", "lr", "wd", "warmup", "beta1", "beta2", "eps")}
    return Trained(
        Path(got["checkpoint"]),
        int(got["steps"]),
        int(got["batch_size"]),
        float(got["train_seconds"]),
        float(got["median_samples_per_s"]),
        float(got["last_loss"]),
        hyper,
    )


def steps_for_seconds(short: Trained, long: Trained, seconds: float) -> int:
    """Steps whose run takes ``seconds``, from two timing runs of one tool: a line through
    (steps, wall-clock) of both. Its slope is the real cost of a step, data-loader stalls and
    logging included (a median step rate leaves those out and under-predicts a long run);
    its intercept the fixed cost (start-up, the first slow steps, the final save)."""
    if long.steps <= short.steps:
        raise BenchmarkError(
            f"the timing runs need different lengths (got {short.steps} and {long.steps} steps)"
        )
    step_s = (long.train_seconds - short.train_seconds) / (long.steps - short.steps)
    if step_s <= 0:
        # the longer run was not slower: timing noise beyond the steps' cost (a loaded machine)
        raise BenchmarkError(
            f"timing runs of {short.steps} and {long.steps} steps took {short.train_seconds:.1f} "
            f"and {long.train_seconds:.1f} s: no cost per step to size --seconds from; run on an "
            "idle machine or raise --timing-steps"
        )
    fixed = max(0.0, short.train_seconds - short.steps * step_s)
    return max(1, int((seconds - fixed) / step_s))


# ----------------------------------------------------------------------------- evaluation


def evaluate(loaded: LoadedModel, sets: TestSets, info: DistInfo) -> dict[str, float]:
    """The headline figures of one model: twemoji R@K both ways, twemoji zero-shot category
    accuracy, Noto R@K both ways -- clipforge.eval's exact retrieval and zero-shot, each set
    read and embedded once (what ``clipforge-eval retrieval`` and ``zeroshot`` compute)."""
    data_cfg = EvalDataConfig(workers=0)
    ret_cfg = RetrievalConfig(ks=KS, device="cpu")
    out: dict[str, float] = {}
    for style, data in (("twemoji", sets.twemoji), ("noto", sets.noto)):
        emb = embed_eval_set(
            loaded.model, loaded.tokenizer, loaded.image_transforms(), str(data), data_cfg, info
        )
        out[f"{style}_images"] = float(emb.image_emb.shape[0])
        out[f"{style}_texts"] = float(len(emb.captions))
        metrics = evaluate_retrieval(emb, info, ret_cfg)
        for direction, short in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
            for k in KS:
                out[f"{style}_{short}_R@{k}"] = float(metrics[direction][f"R@{k}"])
        if style == "twemoji":
            classnames = sorted({str(c) for c in emb.labels})
            with torch.no_grad():
                classifier = build_classifier(
                    loaded.model, loaded.tokenizer, classnames, load_templates(), info.device
                )
            zs = evaluate_zeroshot(emb, classifier, classnames)
            out["twemoji_zeroshot_acc@1"] = float(zs["acc1"])
            out["twemoji_zeroshot_mean_per_class_recall"] = float(zs["mean_per_class_recall"])
    return out


def category_majority_share(test_set: Path) -> tuple[float, int]:
    """(share of the most common category, number of categories) in a test set: the accuracy
    of always answering the largest class, for reading the zero-shot figure."""
    counts: dict[str, int] = {}
    for shard in sorted(test_set.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                f = tar.extractfile(m) if m.name.endswith(".json") else None
                if f is not None:
                    cat = json.loads(f.read())["category"]
                    counts[cat] = counts.get(cat, 0) + 1
    return max(counts.values()) / sum(counts.values()), len(counts)


# ----------------------------------------------------------------------------- the benchmark


HEADLINE = (
    ("twemoji_t2i_R@1", "t2i R@1"),
    ("twemoji_t2i_R@5", "t2i R@5"),
    ("twemoji_t2i_R@10", "t2i R@10"),
    ("twemoji_i2t_R@1", "i2t R@1"),
    ("twemoji_i2t_R@5", "i2t R@5"),
    ("twemoji_i2t_R@10", "i2t R@10"),
    ("twemoji_zeroshot_acc@1", "zs acc"),
    ("noto_t2i_R@10", "Noto t2i R@10"),
)
"""The table's figure columns: (key, header)."""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run (``run``'s flags)."""

    work: Path
    """Scratch and output folder: data/, test sets, runs/, generalisation.json."""
    cache: Path
    """Where the npm tarball is (``fetch`` puts it there)."""
    train_data: Path | None
    """Training shards (a folder with name/unified/category in each .json); None: the demo
    shards, written under ``work``."""
    seconds: float
    """Training wall-clock per run in the ``time`` setting."""
    steps: int
    """Optimizer steps per run in the ``steps`` setting."""
    seeds: tuple[int, ...]
    """Seeds (model init, data order) of every tool and setting."""
    settings: tuple[str, ...]
    """``time`` (equal wall-clock) and/or ``steps`` (equal steps)."""
    peer_python: str | None
    """The open_clip_train interpreter (None: clipforge alone)."""
    peer_clipforge_recipe: bool
    """Also train open_clip_train with clipforge's batch, lr, weight decay and warmup."""
    overrides: tuple[str, ...] = ()
    """Extra ``--set`` overrides of clipforge's recipe (they apply to the peer's model/data)."""
    timing_steps: int = TIMING_STEPS
    """Steps of the timing run that sizes each tool's equal-wall-clock run."""


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f}±{statistics.stdev(values):.3f}"


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, tool): mean, sample standard deviation and the values over seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["tool"]), []).append(r)
    out = []
    for (setting, tool), rows in groups.items():
        entry: dict[str, Any] = {
            "setting": setting,
            "tool": tool,
            "seeds": [r["seed"] for r in rows],
        }
        for key in (
            "steps",
            "train_seconds",
            *[k for k, _ in HEADLINE],
            "twemoji_zeroshot_mean_per_class_recall",
        ):
            values = [float(r[key]) for r in rows]
            entry[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "values": values,
            }
        out.append(entry)
    return out


def format_table(runs: list[dict[str, Any]]) -> str:
    """One line per (setting, tool): mean±std over seeds of steps, seconds and the figures."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["setting"], r["tool"]), []).append(r)
    header = ["setting", "tool", "seeds", "steps", "train s", *[h for _, h in HEADLINE]]
    lines = [header]
    for (setting, tool), rows in groups.items():
        steps = [float(r["steps"]) for r in rows]
        secs = [float(r["train_seconds"]) for r in rows]
        lines.append(
            [
                setting,
                tool,
                str(len(rows)),
                f"{statistics.fmean(steps):.0f}",
                f"{statistics.fmean(secs):.0f}",
                *[_mean_spread([float(r[k]) for r in rows]) for k, _ in HEADLINE],
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    # the two name columns left-aligned, the figures right-aligned
    aligned = [
        [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        for row in lines
    ]
    return "\n".join("  ".join(row) for row in aligned)


def run_benchmark(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    """Build the test sets, train every (setting, tool, seed), evaluate, print the table."""
    load_before = os.getloadavg()
    if cfg.train_data is None:
        train_dir = cfg.work / "data" / "noto-train"
        write_demo_shards(train_dir)
    else:
        train_dir = cfg.train_data
    sets = build_test_sets(train_dir, cfg.cache / TWITTER_TGZ, cfg.work / "data")
    majority, n_categories = category_majority_share(sets.twemoji)
    log(
        f"test sets: {sets.emoji} emoji in each style ({sets.without_twemoji} training emoji "
        f"without a twemoji image left out), {n_categories} categories (largest "
        f"{majority:.1%}) -> {sets.twemoji}, {sets.noto}"
    )
    recipe = clipforge_recipe(train_dir, [*TRANSFER_OVERRIDES, *cfg.overrides])
    tools: list[tuple[str, PeerRecipe | None]] = [("clipforge", None)]
    if cfg.peer_python:
        tools.append(("open_clip_train", PeerRecipe("open_clip_train")))
        if cfg.peer_clipforge_recipe:
            o = recipe.optim
            tools.append(
                (
                    "open_clip_train+cf-recipe",
                    PeerRecipe(
                        "open_clip_train+cf-recipe",
                        recipe.data.batch_size,
                        o.lr,
                        o.weight_decay,
                        o.warmup_steps,
                    ),
                )
            )
    runs_dir = cfg.work / "runs"

    def train_one(tool: PeerRecipe | None, where: Path, steps: int, seed: int) -> Trained:
        if tool is None:
            return train_clipforge(recipe, where, steps, seed)
        assert cfg.peer_python is not None
        return train_peer(cfg.peer_python, recipe, tool, where, steps, seed)

    # Equal wall-clock: each tool's step count from a short timing run of its own.
    time_steps: dict[str, int] = {}
    timing: dict[str, dict[str, Any]] = {}
    if "time" in cfg.settings:
        for name, tool in tools:
            short, long = (
                train_one(tool, runs_dir / "timing" / f"{name}-{n}", n, cfg.seeds[0])
                for n in (cfg.timing_steps, cfg.timing_steps * TIMING_LONG_FACTOR)
            )
            time_steps[name] = steps_for_seconds(short, long, cfg.seconds)
            timing[name] = {
                "steps": [short.steps, long.steps],
                "train_seconds": [short.train_seconds, long.train_seconds],
                "samples_per_s": [short.samples_per_s, long.samples_per_s],
                "steps_for_budget": time_steps[name],
            }
            log(
                f"timing {name}: {short.steps} steps in {short.train_seconds:.1f} s, "
                f"{long.steps} in {long.train_seconds:.1f} s -> {time_steps[name]} steps "
                f"for {cfg.seconds:g} s"
            )
    runs: list[dict[str, Any]] = []
    info = setup("cpu")
    try:
        for seed in cfg.seeds:
            for setting in cfg.settings:
                for name, tool in tools:
                    steps = time_steps[name] if setting == "time" else cfg.steps
                    where = runs_dir / f"{setting}-{name}-seed{seed}"
                    load = os.getloadavg()[0]
                    t = train_one(tool, where, steps, seed)
                    loaded = load_model(t.model, "cpu", None if tool is None else recipe.model.name)
                    figures = evaluate(loaded, sets, info)
                    row = {
                        "setting": setting,
                        "tool": name,
                        "seed": seed,
                        "steps": t.steps,
                        "batch_size": t.batch_size,
                        "train_seconds": t.train_seconds,
                        "samples_per_s": t.samples_per_s,
                        "last_loss": t.last_loss,
                        "hyperparameters": t.hyper,
                        "load_1min_at_start": round(load, 2),
                        **figures,
                    }
                    runs.append(row)
                    log(
                        f"{setting:<5} {name:<26} seed {seed}: {t.steps} steps in "
                        f"{t.train_seconds:.0f} s (load {load:.1f}); twemoji t2i R@10 "
                        f"{figures['twemoji_t2i_R@10']:.3f}, i2t R@10 "
                        f"{figures['twemoji_i2t_R@10']:.3f}, zero-shot "
                        f"{figures['twemoji_zeroshot_acc@1']:.3f}; Noto t2i R@10 "
                        f"{figures['noto_t2i_R@10']:.3f}"
                    )
    finally:
        shutdown(info)
    load_after = os.getloadavg()
    log("")
    log(format_table(runs))
    log(
        f"(mean±std over seeds; twemoji = {sets.emoji} unseen-style images, captions = the names; "
        f"zs = zero-shot category accuracy, largest category {majority:.1%}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
        f"{os.cpu_count()} CPUs)"
    )
    return {
        "config": {
            "seconds": cfg.seconds,
            "steps": cfg.steps,
            "seeds": list(cfg.seeds),
            "settings": list(cfg.settings),
            "model": recipe.model.name,
            "train_data": str(train_dir),
            "clipforge_overrides": [*TRANSFER_OVERRIDES, *cfg.overrides],
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
        "test_sets": {
            "emoji": sets.emoji,
            "without_twemoji": sets.without_twemoji,
            "categories": n_categories,
            "largest_category_share": majority,
            "twemoji": str(sets.twemoji),
            "noto": str(sets.noto),
        },
        "timing": timing,
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "runs": runs,
        "summary": summarise(runs),
    }


ABLATIONS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "crop": ("data.augment=true",),
    "crop-strong": ("data.augment=true", "data.crop_scale_min=0.5"),
    "jitter": ("data.color_jitter=0.4",),
    "grayscale": ("data.grayscale=0.2",),
    "blur": ("data.blur=0.5",),
    "style-all": (
        "data.augment=true",
        "data.crop_scale_min=0.5",
        "data.color_jitter=0.4",
        "data.grayscale=0.2",
        "data.blur=0.5",
    ),
    "captions-as-written": ("data.caption_subsets=0", "data.caption_name_only=0"),
    "no-name-only": ("data.caption_name_only=0",),
    "temperature-clip": ("loss.init_logit_scale=2.6592",),
    "warmup-10pct": ("optim.warmup_fraction=0.1",),
    "ema": ("train.ema_decay=0.99",),
    "crop+blur": ("data.augment=true", "data.blur=0.5"),
    "crop+blur+ema": ("data.augment=true", "data.blur=0.5", "train.ema_decay=0.99"),
}
"""The ablation variants, each a list of ``--set`` overrides of the demo's recipe
(``baseline``). The single changes were fixed before any was measured; the two combinations
join the ones that helped on seed 0 (measured on the other seeds too). ``warmup-10pct`` is
resolved against the run length: warmup = 10 % of ``--steps`` (the recipe's is 1 %)."""


def _variant_overrides(name: str, extra: Sequence[str], steps: int) -> list[str]:
    if name in ABLATIONS:
        sets = list(ABLATIONS[name])
    elif name.startswith("set:"):
        sets = [s for s in name[4:].split(";") if s]
    else:
        raise BenchmarkError(
            f"unknown variant {name!r}: one of {', '.join(ABLATIONS)}, or set:KEY=V;KEY=V"
        )
    out = []
    for item in sets:
        if item.startswith("optim.warmup_fraction="):
            out.append(f"optim.warmup_steps={round(float(item.split('=')[1]) * steps)}")
        else:
            out.append(item)
    return [*extra, *out]


STAGE2_NEGATIVES = 4
"""Hard negatives mined per image for ``--stage2-steps``, and trained with per image."""


def mine_hard_negatives(model: Path, train_dir: Path, work: Path) -> tuple[Path, float]:
    """Embed the training shards with ``model`` and mine ``STAGE2_NEGATIVES`` hard negatives
    per image, through the product's commands; (the negatives file, seconds both took)."""
    from clipforge.index.cli import main as index_main

    if work.exists():
        shutil.rmtree(work)
    emb, out = work / "emb", work / "hard_negatives.jsonl"
    t0 = time.perf_counter()
    embed = ["embed", "--model", str(model), "--data", str(train_dir), "--out", str(emb),
             "--device", "cpu", "--workers", "1", "--progress", "none"]  # fmt: skip
    mine = ["mine", str(emb), "--out", str(out), "--k", str(STAGE2_NEGATIVES)]
    if index_main(embed) != 0 or index_main(mine) != 0:
        raise BenchmarkError(f"embedding or mining {train_dir} with {model} failed (see above)")
    return out, round(time.perf_counter() - t0, 2)


def run_ablation(
    work: Path,
    cache: Path,
    train_data: Path | None,
    variants: Sequence[str],
    steps: int,
    seeds: Sequence[int],
    extra: Sequence[str] = (),
    log: Any = print,
    stage2_steps: int = 0,
) -> dict[str, Any]:
    """Train clipforge's recipe once per (variant, seed) for ``steps`` steps (equal steps, so
    the figures do not depend on the machine's load) and score each on the unseen style.

    ``stage2_steps``: then, per seed, continue the baseline's model for that many steps twice,
    without and with hard negatives mined by the baseline model (``clipforge-index embed`` of
    the training shards, then ``clipforge-index mine``): whether mined negatives help, at equal
    steps from the same weights."""
    if train_data is None:
        train_dir = work / "data" / "noto-train"
        write_demo_shards(train_dir)
    else:
        train_dir = train_data
    sets = build_test_sets(train_dir, cache / TWITTER_TGZ, work / "data")
    overrides = {v: _variant_overrides(v, extra, steps) for v in variants}
    for variant_sets in overrides.values():  # a bad override fails before any training
        clipforge_recipe(train_dir, variant_sets)
    if stage2_steps and "baseline" not in overrides:
        raise BenchmarkError("--stage2-steps continues the baseline: include it in --variants")
    runs: list[dict[str, Any]] = []
    info = setup("cpu")

    def train_and_score(
        variant: str, variant_sets: list[str], n: int, seed: int, **more: Any
    ) -> None:
        where = work / "ablation" / f"{variant.replace(':', '_')}-seed{seed}"
        t = train_clipforge(clipforge_recipe(train_dir, variant_sets), where, n, seed)
        figures = evaluate(load_model(t.model, "cpu"), sets, info)
        runs.append(
            {
                "setting": "steps",
                "tool": variant,
                "overrides": variant_sets,
                "seed": seed,
                "steps": t.steps,
                "train_seconds": t.train_seconds,
                "last_loss": t.last_loss,
                **more,
                **figures,
            }
        )
        log(
            f"{variant:<22} seed {seed}: {t.steps} steps in {t.train_seconds:.0f} s; "
            f"twemoji t2i R@10 {figures['twemoji_t2i_R@10']:.3f}, i2t R@10 "
            f"{figures['twemoji_i2t_R@10']:.3f}; Noto t2i R@10 "
            f"{figures['noto_t2i_R@10']:.3f}"
        )

    try:
        for seed in seeds:
            for variant, variant_sets in overrides.items():
                train_and_score(variant, variant_sets, steps, seed)
            if stage2_steps:
                base = work / "ablation" / f"baseline-seed{seed}" / "model"
                negatives, mine_seconds = mine_hard_negatives(
                    base, train_dir, work / "stage2" / f"seed{seed}"
                )
                # Both continue from the baseline's weights for the same steps (a fresh warmup
                # and decay); the only difference is the mined negatives.
                with_negatives = [
                    f"data.hard_negatives={negatives}",
                    f"data.hard_negatives_per_sample={STAGE2_NEGATIVES}",
                ]
                for variant, more in (("stage2-plain", []), ("stage2-hardneg", with_negatives)):
                    train_and_score(
                        variant,
                        [*extra, f"model.init_checkpoint={base}", *more],
                        stage2_steps,
                        seed,
                        mine_seconds=mine_seconds if more else 0.0,
                    )
    finally:
        shutdown(info)
    log("")
    log(format_table(runs))
    log(
        f"(mean±std over seeds {', '.join(map(str, seeds))}; {steps} steps each; "
        f"{sets.emoji} emoji)"
    )
    return {
        "config": {
            "steps": steps,
            "stage2_steps": stage2_steps,
            "seeds": list(seeds),
            "variants": list(variants),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
        },
        "variants": overrides,
        "runs": runs,
        "summary": summarise(runs),
    }


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 0,1,2; got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("at least one seed")
    return seeds


def _settings(text: str) -> tuple[str, ...]:
    settings = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in settings if s not in ("time", "steps")]
    if bad or not settings:
        raise argparse.ArgumentTypeError(f"settings are time and/or steps; got {text!r}")
    return settings


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """Where the benchmark works, its npm cache, and the training shards (run and ablate)."""
    p.add_argument("--work", type=Path, default=Path(DEFAULT_WORK), help="(default %(default)s)")
    p.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="(default %(default)s)")
    p.add_argument(
        "--train-data",
        type=Path,
        help="training shards whose .json name each emoji (default: the demo's Noto shards)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:5]),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help=f"npm pack {TWITTER_PACKAGE} into --cache")
    f.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="(default %(default)s)")
    r = sub.add_parser("run", help="train both tools, evaluate on twemoji, print the table")
    _add_data_options(r)
    r.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="equal wall-clock per run, seconds (default %(default)s)",
    )
    r.add_argument(
        "--steps",
        type=int,
        default=DemoConfig().steps,
        help="equal steps per run (default: clipforge-demo's, %(default)s)",
    )
    r.add_argument("--seeds", type=_seeds, default=(0,), help="e.g. 0,1,2 (default 0)")
    r.add_argument(
        "--settings", type=_settings, default=("time", "steps"), help="time,steps (default both)"
    )
    r.add_argument(
        "--peer-python",
        help=f"python of the open_clip_train venv (default ${OPEN_CLIP_TRAIN.env_var})",
    )
    r.add_argument(
        "--no-peer",
        action="store_true",
        help="clipforge alone, no peer venv needed (default: with the peer)",
    )
    r.add_argument(
        "--peer-clipforge-recipe",
        action="store_true",
        help="add open_clip_train with clipforge's batch, lr, weight decay and warmup "
        "(default: its defaults only)",
    )
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override clipforge's recipe (repeatable), as clipforge-pretrain takes them "
        "(default: none)",
    )
    r.add_argument(
        "--timing-steps",
        type=int,
        default=TIMING_STEPS,
        help="steps of the shorter of the two runs that time each tool for --seconds (the "
        f"longer has {TIMING_LONG_FACTOR}x as many; default %(default)s)",
    )
    r.add_argument(
        "--json", type=Path, help="where the figures go (default WORK/generalisation.json)"
    )
    a = sub.add_parser(
        "ablate", help="clipforge's recipe with one change at a time, equal steps, seeds"
    )
    _add_data_options(a)
    a.add_argument(
        "--variants",
        default=",".join(ABLATIONS),
        help="comma-separated: built-in names, or set:KEY=V;KEY=V (default: all, %(default)s)",
    )
    a.add_argument("--steps", type=int, default=DemoConfig().steps, help="(default %(default)s)")
    a.add_argument("--seeds", type=_seeds, default=(0, 1, 2), help="(default 0,1,2)")
    a.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override every variant's recipe (repeatable; default: none)",
    )
    a.add_argument(
        "--stage2-steps",
        type=int,
        default=0,
        help="then continue each seed's baseline this many steps without and with hard "
        "negatives mined by it (default 0: not run)",
    )
    a.add_argument("--json", type=Path, help="(default WORK/ablation.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 2 with a one-line error for bad input or a missing peer, 3 when a
    training run aborts."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "fetch":
            print(f"{fetch(args.cache)}")
            return 0
        if args.command == "ablate":
            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
            if args.steps < 1 or args.stage2_steps < 0 or not variants:
                raise BenchmarkError(
                    "--steps must be positive, --stage2-steps not negative, --variants not empty"
                )
            for v in variants:  # a bad name or --set fails before any training
                clipforge_recipe(Path("."), _variant_overrides(v, args.overrides, args.steps))
            figures = run_ablation(
                args.work,
                args.cache,
                args.train_data,
                variants,
                args.steps,
                args.seeds,
                tuple(args.overrides),
                log=lambda line: print(line, flush=True),
                stage2_steps=args.stage2_steps,
            )
            out = args.json or args.work / "ablation.json"
            write_json_atomic(out, figures)
            print(f"figures -> {out}")
            return 0
        if args.steps < 1 or args.seconds <= 0 or args.timing_steps <= TIMING_EXCLUDED:
            raise BenchmarkError(
                f"--steps and --seconds must be positive, --timing-steps over {TIMING_EXCLUDED}"
            )
        python = (
            None
            if args.no_peer
            else peer_python(OPEN_CLIP_TRAIN, args.peer_python, alone="--no-peer")
        )
        cfg = BenchConfig(
            work=args.work,
            cache=args.cache,
            train_data=args.train_data,
            seconds=args.seconds,
            steps=args.steps,
            seeds=args.seeds,
            settings=args.settings,
            peer_python=python,
            peer_clipforge_recipe=args.peer_clipforge_recipe,
            overrides=tuple(args.overrides),
            timing_steps=args.timing_steps,
        )
        clipforge_recipe(args.train_data or Path("."), cfg.overrides)  # bad --set fails here
        figures = run_benchmark(cfg, log=lambda line: print(line, flush=True))
    except (
        BenchmarkError,
        ConfigError,
        ShardSpecError,
        EvalDataError,
        PeerError,
        FileNotFoundError,
    ) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except TrainingAborted as e:
        print(f"{PROG}: training aborted: {e}", file=sys.stderr)
        return 3
    out = args.json or args.work / "generalisation.json"
    write_json_atomic(out, figures)
    print(f"figures -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
