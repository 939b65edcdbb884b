"""``python -m benchmarks.generalisation`` at tiny sizes: generated pictures stand in for both
drawing styles (a fake npm tarball for twemoji, no npm at test time). The test sets must pair
each training emoji's name and category with the other style's image by unified codepoint; the
whole run (timing, equal wall-clock, equal steps, clipforge's eval) must produce its table and
JSON; open_clip_train's half runs only where its venv is configured."""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from benchmarks import generalisation
from benchmarks.generalisation import (
    TWITTER_TGZ,
    Trained,
    build_parser,
    build_test_sets,
    format_table,
    main,
    steps_for_seconds,
    summarise,
)
from benchmarks.peer_python import OPEN_CLIP_ENV
from clipforge.data_tools.writer import WriteConfig, write_shards
from tests.test_benchmarks.helptext import check_every_option_has_help_with_its_default
from tests.test_data_tools.shard_helpers import all_samples

COLOURS = [
    (220, 30, 30),
    (30, 160, 40),
    (40, 60, 220),
    (240, 200, 20),
    (160, 40, 200),
    (20, 200, 200),
    (250, 120, 10),
    (90, 90, 90),
    (200, 90, 140),
    (120, 70, 20),
    (10, 10, 10),
    (130, 200, 60),
]
CATEGORIES = ["Shapes", "Signs", "Things"]
MISSING_FROM_TWITTER = "E00B"  # a training emoji the other style has no image of


def _emoji(i: int) -> dict[str, str]:
    return {
        "unified": f"E{i:03X}",
        "name": f"emoji number {i}",
        "category": CATEGORIES[i % len(CATEGORIES)],
    }


def _drawing(colour: tuple[int, int, int], style: str) -> Image.Image:
    """Style "noto": a filled disc on white; style "twitter": a square outline on transparency
    (the writer composites it onto white)."""
    if style == "noto":
        img = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(img).ellipse((8, 8, 56, 56), fill=colour)
    else:
        img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
        ImageDraw.Draw(img).rectangle((10, 10, 54, 54), outline=(*colour, 255), width=8)
    return img


@pytest.fixture(scope="module")
def styles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(Noto-like training shards, a fake emoji-datasource-twitter npm tarball)."""
    root = tmp_path_factory.mktemp("styles")
    rows = []
    for i, colour in enumerate(COLOURS):
        path = root / "noto" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        _drawing(colour, "noto").save(path)
        e = _emoji(i)
        rows.append({"image": f"noto/{i}.png", "caption": f"{e['name']}, tag", **e})
    table = root / "train.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = root / "train"
    write_shards(
        table,
        train,
        WriteConfig(image_size=64, image_format="webp", shard_size=5, prefix="emoji"),
        progress=False,
    )
    tgz = root / "npm" / TWITTER_TGZ
    tgz.parent.mkdir()
    entries = []
    with tarfile.open(tgz, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        # the training emoji but one, plus one the training set does not have
        for i, colour in [*enumerate(COLOURS), (40, (1, 2, 3))]:
            unified = f"E{i:03X}"
            if unified == MISSING_FROM_TWITTER:
                continue
            image = f"{unified.lower()}.png"
            buf = io.BytesIO()
            _drawing(colour, "twitter").save(buf, "PNG")
            add(f"img/twitter/64/{image}", buf.getvalue())
            entries.append({"unified": unified, "image": image, "has_img_twitter": True})
        add("emoji.json", json.dumps(entries).encode())
        add("LICENSE", b"The MIT License (MIT)\n\nCopyright (c) 2013 Cal Henderson\n")
    return train, tgz


def _decoded(sample: dict[str, bytes], ext: str) -> bytes:
    with Image.open(io.BytesIO(sample[ext])) as img:
        return img.convert("RGB").tobytes()


def test_test_sets_pair_each_name_with_the_other_style(
    styles: tuple[Path, Path], tmp_path: Path
) -> None:
    train, tgz = styles
    sets = build_test_sets(train, tgz, tmp_path)
    assert (sets.emoji, sets.without_twemoji) == (len(COLOURS) - 1, 1)
    training = {json.loads(s["json"])["unified"]: s for s in all_samples(train).values()}
    twemoji = {json.loads(s["json"])["unified"]: s for s in all_samples(sets.twemoji).values()}
    noto = {json.loads(s["json"])["unified"]: s for s in all_samples(sets.noto).values()}
    assert set(twemoji) == set(noto) == set(training) - {MISSING_FROM_TWITTER}
    for unified, sample in twemoji.items():
        meta, train_meta = json.loads(sample["json"]), json.loads(training[unified]["json"])
        assert sample["txt"].decode() == train_meta["name"] == meta["name"]
        assert meta["category"] == train_meta["category"]
        assert noto[unified]["txt"] == sample["txt"]
        # in style: the very training pixels; the other style: a different drawing
        assert _decoded(noto[unified], "png") == _decoded(training[unified], "webp")
        assert _decoded(sample, "webp") != _decoded(training[unified], "webp")
        assert not meta["source"].startswith("/")  # no temp dir in the .json
    notice = (sets.twemoji / "NOTICE").read_text()
    assert "CC-BY 4.0" in notice and "Twitter, Inc" in notice and "Cal Henderson" in notice
    stamp = (tmp_path / "build.json").stat().st_mtime_ns
    again = build_test_sets(train, tgz, tmp_path)  # same inputs: reused, not rewritten
    assert again == sets and (tmp_path / "build.json").stat().st_mtime_ns == stamp


def test_run_without_peer_prints_table_and_json(
    styles: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, tgz = styles
    out = tmp_path / "figures.json"
    argv = [
        "run", "--no-peer", "--work", str(tmp_path / "work"), "--cache", str(tgz.parent),
        "--train-data", str(train), "--seconds", "3", "--steps", "4", "--timing-steps", "6",
        "--seeds", "1", "--set", "data.batch_size=8", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "11 emoji in each style (1 training emoji without a twemoji image left out)" in printed
    figures = json.loads(out.read_text())
    runs = figures["runs"]
    assert [(r["setting"], r["seed"]) for r in runs] == [("time", 1), ("steps", 1)]
    for r in runs:
        assert r["tool"] == "clipforge" and r["batch_size"] == 8
        assert r["hyperparameters"]["caption_subsets"] > 0  # the demo recipe, not the preset
        # every name queried all images of each style, through clipforge's eval
        assert r["twemoji_images"] == r["twemoji_texts"] == r["noto_images"] == 11
        for key, value in r.items():
            if key.startswith(("twemoji_", "noto_")) and not key.endswith(("images", "texts")):
                assert 0.0 <= value <= 1.0, key
    assert {r["steps"] for r in runs if r["setting"] == "steps"} == {4}
    assert figures["timing"]["clipforge"]["steps_for_budget"] == runs[0]["steps"] >= 1
    summary = {(s["setting"], s["tool"]): s for s in figures["summary"]}
    steps_row = summary[("steps", "clipforge")]
    assert steps_row["seeds"] == [1] and steps_row["twemoji_t2i_R@10"]["std"] is None
    assert steps_row["twemoji_t2i_R@10"]["values"] == [runs[1]["twemoji_t2i_R@10"]]
    assert figures["test_sets"] == {
        **figures["test_sets"],
        "emoji": 11,
        "without_twemoji": 1,
        "categories": 3,
    }
    assert "setting  tool" in printed and "Noto t2i R@10" in printed


def test_ablate_runs_each_variant_with_its_overrides(
    styles: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train, tgz = styles
    out = tmp_path / "ablation.json"
    argv = [
        "ablate", "--work", str(tmp_path / "work"), "--cache", str(tgz.parent),
        "--train-data", str(train), "--steps", "3", "--seeds", "0",
        "--variants", "baseline,style-all,warmup-10pct,set:data.grayscale=1.0",
        "--set", "data.batch_size=8", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    figures = json.loads(out.read_text())
    by_variant = {r["tool"]: r for r in figures["runs"]}
    assert list(by_variant) == ["baseline", "style-all", "warmup-10pct", "set:data.grayscale=1.0"]
    assert by_variant["baseline"]["overrides"] == ["data.batch_size=8"]
    assert "data.color_jitter=0.4" in by_variant["style-all"]["overrides"]
    assert "optim.warmup_steps=0" in by_variant["warmup-10pct"]["overrides"]  # 10 % of 3 steps
    assert by_variant["set:data.grayscale=1.0"]["overrides"][-1] == "data.grayscale=1.0"
    # each run trained with its own recipe: the run's config.yaml says so
    config = (tmp_path / "work" / "ablation" / "style-all-seed0" / "config.yaml").read_text()
    assert "color_jitter: 0.4" in config and "crop_scale_min: 0.5" in config
    for r in figures["runs"]:
        assert r["steps"] == 3 and 0.0 <= r["twemoji_t2i_R@10"] <= 1.0
    assert "style-all" in capsys.readouterr().out
    assert main([*argv[:-2], "--variants", "no-such-variant"]) == 2


def test_ablate_stage2_continues_the_baseline_with_mined_negatives(
    styles: tuple[Path, Path], tmp_path: Path
) -> None:
    train, tgz = styles
    out = tmp_path / "ablation.json"
    argv = [
        "ablate", "--work", str(tmp_path / "work"), "--cache", str(tgz.parent),
        "--train-data", str(train), "--steps", "2", "--seeds", "0", "--variants", "baseline",
        "--stage2-steps", "2", "--set", "data.batch_size=8", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    runs = {r["tool"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["baseline", "stage2-plain", "stage2-hardneg"]
    base_model = tmp_path / "work" / "ablation" / "baseline-seed0" / "model"
    for name in ("stage2-plain", "stage2-hardneg"):
        assert f"model.init_checkpoint={base_model}" in runs[name]["overrides"]
        assert runs[name]["steps"] == 2
    mined = tmp_path / "work" / "stage2" / "seed0" / "hard_negatives.jsonl"
    assert f"data.hard_negatives={mined}" in runs["stage2-hardneg"]["overrides"]
    assert runs["stage2-hardneg"]["mine_seconds"] > 0
    # the mined file: one line per training emoji after its header, never the image's own name
    lines = mined.read_text().splitlines()
    assert json.loads(lines[0])["count"] == len(lines) - 1 == 12
    metrics = tmp_path / "work" / "ablation" / "stage2-hardneg-seed0" / "metrics.jsonl"
    assert json.loads(metrics.read_text().splitlines()[-1])["samples_without_hard_negatives"] == 0
    assert main([*argv[:-4], "--variants", "crop", "--stage2-steps", "2"]) == 2


def test_steps_for_seconds_and_the_table() -> None:
    # 10 steps in 3 s, 50 in 7 s: 0.1 s a step (not the 1/80 s the median rate says), 2 s fixed
    short = Trained(Path("x"), 10, 8, 3.0, 640.0, 1.0, {})
    long = Trained(Path("y"), 50, 8, 7.0, 640.0, 1.0, {})
    assert steps_for_seconds(short, long, 12.0) == 100
    assert steps_for_seconds(short, long, 1.0) == 1  # never zero steps
    with pytest.raises(generalisation.BenchmarkError, match="no cost per step"):
        steps_for_seconds(short, replace(long, train_seconds=2.9), 12.0)
    with pytest.raises(generalisation.BenchmarkError, match="different lengths"):
        steps_for_seconds(short, short, 12.0)
    runs = [
        {"setting": "time", "tool": "clipforge", "seed": s, "steps": 10, "train_seconds": 5.0}
        | {k: v for k, _ in generalisation.HEADLINE for v in [0.25 * (s + 1)]}
        | {"twemoji_zeroshot_mean_per_class_recall": 0.5}
        for s in (0, 1)
    ]
    table = format_table(runs)
    assert "0.375±0.177" in table  # mean and sample std of 0.25 and 0.5
    assert summarise(runs)[0]["twemoji_t2i_R@10"]["std"] == pytest.approx(0.1767767)


def test_refusals_name_what_to_do(
    styles: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train, tgz = styles

    def not_reached(*_: object) -> None:
        raise AssertionError("trained before the inputs were checked")

    monkeypatch.setattr(generalisation, "train_clipforge", not_reached)
    base = ["run", "--work", str(tmp_path), "--train-data", str(train)]
    monkeypatch.delenv(OPEN_CLIP_ENV, raising=False)
    assert main([*base, "--cache", str(tgz.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no open_clip_train interpreter given" in err
    assert "--no-peer" in err
    assert main([*base, "--no-peer", "--cache", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no {tmp_path / 'empty' / TWITTER_TGZ}" in err
    assert "generalisation fetch" in err
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    Image.new("RGB", (8, 8)).save(nameless / "a.png")
    (nameless / "a.txt").write_text("a caption")
    write_shards(nameless, tmp_path / "nameless-shards", WriteConfig(image_size=8), progress=False)
    argv = ["run", "--no-peer", "--work", str(tmp_path), "--cache", str(tgz.parent)]
    assert main([*argv, "--train-data", str(tmp_path / "nameless-shards")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no name, unified, category" in err
    assert main([*argv, "--set", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_help_says_every_default() -> None:
    parser = build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    check_every_option_has_help_with_its_default(run)


@pytest.mark.skipif(
    not os.environ.get(OPEN_CLIP_ENV),
    reason=f"no open_clip_train venv: set {OPEN_CLIP_ENV} (benchmarks/README.md says how)",
)
def test_open_clip_train_checkpoint_goes_through_the_same_eval(
    styles: tuple[Path, Path], tmp_path: Path
) -> None:
    train, tgz = styles
    out = tmp_path / "figures.json"
    argv = [
        "run", "--work", str(tmp_path / "work"), "--cache", str(tgz.parent),
        "--train-data", str(train), "--settings", "steps", "--steps", "3",
        "--set", "data.batch_size=8", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    runs = {r["tool"]: r for r in json.loads(out.read_text())["runs"]}
    peer = runs["open_clip_train"]
    # open_clip_train's own defaults, not clipforge's recipe
    assert (
        peer["hyperparameters"]["batch_size"] == 64 and peer["hyperparameters"]["warmup"] == 10000
    )
    assert peer["steps"] == 3 and peer["train_seconds"] > 0
    for key in ("twemoji_t2i_R@10", "twemoji_i2t_R@1", "twemoji_zeroshot_acc@1", "noto_t2i_R@10"):
        assert 0.0 <= peer[key] <= 1.0
