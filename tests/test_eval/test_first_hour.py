"""What a new user meets in the first hour of clipforge-eval, through the real CLIs on shards
written by clipforge-data: zero-shot on shards written from class folders, a clear error when
labels are missing, skipped samples on the console, no output left by a failed command, and a
Recall@K plot whose ticks are the K values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from clipforge.data_tools.cli import main as data_main
from clipforge.eval.cli import main
from clipforge.eval.report import read_report
from tests.test_data_tools.shard_helpers import make_folder_source

MODEL = ["--model-name", "clipforge-tiny", "--workers", "0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init clipforge-tiny saved as a plain open_clip state dict."""
    from clipforge.pretrain.config import ModelConfig
    from clipforge.pretrain.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="clipforge-tiny"))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/cats (4 images) and photos/dogs (3), each with a same-stem caption."""
    root = tmp_path_factory.mktemp("photos")
    make_folder_source(root / "cats", 4, size=(16, 16))
    make_folder_source(root / "dogs", 3, size=(16, 16))
    return root


def _write(src: Path, out: Path, *extra: str) -> Path:
    assert (
        data_main(["write", str(src), str(out), "--image-size", "16", "--no-progress", *extra]) == 0
    )
    return out


def test_zeroshot_runs_on_shards_written_from_class_folders(
    weights: Path, photos: Path, tmp_path: Path, capsys
) -> None:
    shards = _write(photos, tmp_path / "shards", "--label-from-folder")
    out = tmp_path / "z.json"
    argv = ["zeroshot", "--model", str(weights), *MODEL, "--data", str(shards), "--json", str(out)]
    assert main(argv) == 0
    report = read_report(out)
    m = report["metrics"]
    assert report["config"]["classnames"] == ["cats", "dogs"]  # found in the shards' labels
    assert m["samples"] == 7 and m["classes"] == 2 and m["classes_present"] == 2
    assert 0.0 <= m["acc1"] <= 1.0 and 0.0 <= m["mean_per_class_recall"] <= 1.0
    assert "acc1" in capsys.readouterr().out
    # the same figures as on the raw folder (same images, same labels; the shards' images are
    # re-encoded JPEGs, so compare the labels found rather than float scores)
    raw = tmp_path / "raw.json"
    argv = ["zeroshot", "--model", str(weights), *MODEL, "--data", str(photos), "--json", str(raw)]
    assert main(argv) == 0
    assert read_report(raw)["config"]["classnames"] == ["cats", "dogs"]


@pytest.mark.parametrize("classnames", [None, "cats,dogs"])
def test_zeroshot_on_shards_without_labels_says_what_is_missing(
    weights: Path, photos: Path, tmp_path: Path, capsys, classnames: str | None
) -> None:
    shards = _write(photos, tmp_path / "plain")  # no --label-from-folder: no label field
    argv = ["zeroshot", "--model", str(weights), *MODEL, "--data", str(shards)]
    if classnames:
        argv += ["--classnames", classnames]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge-eval: error: ") and err.count("\n") == 1
    assert "no sample has a class label in the field 'category'" in err
    assert "--label-from-folder" in err and "--label-field" in err and "--classnames" in err
    assert "torch.cat" not in err and "Traceback" not in err


def test_skipped_samples_are_printed_by_reason(weights: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    make_folder_source(src, 60, size=(16, 16))
    shards = _write(src, tmp_path / "shards", "--shard-size", "30", "--image-format", "png")
    second = sorted(shards.glob("*.tar"))[1]
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2])  # truncated in the middle
    out = tmp_path / "r.json"
    argv = ["retrieval", "--model", str(weights), *MODEL, "--data", str(shards), "--json", str(out)]
    assert main(argv) == 0
    report = read_report(out)
    read = report["data"]["samples"]
    assert 30 < read < 60
    assert report["data"]["skipped"] == {"truncated_shard": 60 - read}  # samples, not 1 shard
    printed = capsys.readouterr()
    assert f"skipped {60 - read} sample(s): truncated shard" in printed.out + printed.err


def test_a_failed_eval_leaves_no_output_it_created(
    weights: Path, photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    shards = _write(photos, tmp_path / "shards")
    out = tmp_path / "results" / "deep" / "r.json"
    base = ["retrieval", "--model", str(weights), *MODEL, "--json", str(out)]
    # bad data: nothing evaluated, no results folder
    assert main([*base, "--data", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "results").exists()
    # a plot that cannot be made is refused before evaluating: no JSON either
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main([*base, "--data", str(shards), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install 'clipforge[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "results").exists() and not (tmp_path / "p.png").exists()
    monkeypatch.undo()
    # the plot fails after the JSON was written (its folder is a file): the JSON goes too
    pytest.importorskip("matplotlib")
    (tmp_path / "file").write_text("x")
    assert main([*base, "--data", str(shards), "--plot", str(tmp_path / "file" / "p.png")]) == 2
    assert "file" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    # an existing results file from before is not removed by a failed run
    out.parent.mkdir(parents=True)
    out.write_text("{}")
    assert main([*base, "--data", str(tmp_path / "nope")]) == 2
    assert out.read_text() == "{}"


def test_recall_plot_ticks_are_the_k_values(weights: Path, photos: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from clipforge.eval.report import recall_figure

    shards = _write(photos, tmp_path / "shards")
    out, png = tmp_path / "r.json", tmp_path / "recall.png"
    argv = [
        "retrieval", "--model", str(weights), *MODEL, "--data", str(shards), "--k", "1,2,5",
        "--json", str(out), "--plot", str(png),
    ]  # fmt: skip
    assert main(argv) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    fig = recall_figure([read_report(out)], ["tiny"])
    fig.canvas.draw()
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "5"]
        assert ax.xaxis.get_minorticklocs().size == 0  # no unlabelled log minor ticks
