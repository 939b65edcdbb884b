"""``clipforge-eval`` end to end on the session's demo-trained model: retrieval (exact and through
a flat index built by clipforge-index), zero-shot, index quality, compare, plots, and clean
errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from clipforge.eval.cli import main
from clipforge.eval.report import read_report

CLASSNAMES = [
    "Smileys & Emotion", "People & Body", "Component", "Animals & Nature", "Food & Drink",
    "Travel & Places", "Activities", "Objects", "Symbols", "Flags",
]  # fmt: skip


@pytest.fixture(scope="module")
def demo_index(
    trained_demo_run: Path, demo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A flat (exact) float32 index of the demo set, built by clipforge-index."""
    from clipforge.index.cli import main as index_main

    work = tmp_path_factory.mktemp("eval-index")
    emb, idx = work / "emb", work / "index"
    embed = [
        "embed", "--model", str(trained_demo_run), "--data", str(demo), "--out", str(emb),
        "--dtype", "float32", "--workers", "1", "--progress", "none",
    ]  # fmt: skip
    assert index_main(embed) == 0
    assert index_main(["build", "--embeddings", str(emb), "--out", str(idx), "--kind", "flat"]) == 0
    return idx


def test_retrieval_exact_and_through_the_index(
    trained_demo_run: Path, demo: Path, demo_index: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "r.json"
    argv = [
        "retrieval", "--model", str(trained_demo_run), "--data", str(demo), "--k", "1,5,10,50",
        "--json", str(out), "--index", str(demo_index), "--workers", "1", "--query-field", "name",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "text to image" in printed and "image to text" in printed and "index" in printed
    assert "name to image" in printed
    report = read_report(out)
    assert report["task"] == "retrieval"
    assert report["model"]["hash"] and report["command"][:2] == ["clipforge-eval", "retrieval"]
    assert report["data"]["samples"] == 1911
    assert report["data"]["sources"][0]["manifests"]  # the shards' manifest travels along
    exact = report["metrics"]["exact"]
    t2i, i2t = exact["text_to_image"], exact["image_to_text"]
    assert t2i["queries"] == i2t["queries"] == 1911
    names = exact["name_to_image"]  # each emoji's name alone (from its .json) as the query
    assert names["queries"] == 1911 and 0 < names["R@1"] <= names["R@10"] <= names["R@50"]
    assert report["config"]["query_fields"] == ["name"]
    # the recipe's model: text->image R@10 ~0.96 (chance 0.005)
    assert t2i["R@10"] > 0.6 and i2t["R@10"] > 0.6
    assert t2i["R@1"] <= t2i["R@5"] <= t2i["R@10"] <= t2i["R@50"]
    assert 1 <= t2i["median_rank"] <= t2i["mean_rank"] + 100
    # pixel-identical emoji exist: their captions' queries are tied, and reported
    assert t2i["tied_queries"] > 0
    assert t2i["R@1_pessimistic"] <= t2i["R@1"] <= t2i["R@1_optimistic"]
    # A flat index is exact search: its R@K equals the exact figure (to float rounding of
    # the separately computed, differently batched embeddings, which flips near-tied
    # pixel-identical emoji: at most a few queries).
    index = report["metrics"]["index"]
    for d in ("text_to_image", "image_to_text"):
        for k in (1, 5, 10, 50):
            differing = abs(index[d][f"R@{k}"] - exact[d][f"R@{k}"]) * 1911
            assert round(differing) <= 3, (d, k, differing)
    # index quality: flat index recall vs exact search is 1
    iq = tmp_path / "iq.json"
    assert main(["index", "--index", str(demo_index), "--queries", "200", "--json", str(iq)]) == 0
    m = read_report(iq)["metrics"]
    assert m["image.index"]["recall"] == pytest.approx(1.0)
    assert m["image.index"]["queries"] == 200 and m["image.index"]["qps_batched"] > 0
    assert "p99" in capsys.readouterr().out

    # zero-shot on the same model, labels from the .json's category
    names = tmp_path / "classnames.txt"
    names.write_text("\n".join(CLASSNAMES) + "\n")
    zout = tmp_path / "z.json"
    zargv = [
        "zeroshot", "--model", str(trained_demo_run), "--data", str(demo),
        "--classnames", str(names), "--json", str(zout), "--limit", "400",
    ]  # fmt: skip
    assert main(zargv) == 0
    z = read_report(zout)["metrics"]
    assert z["samples"] == 400 and 0.0 <= z["acc1"] <= z["acc5"] <= 1.0
    assert z["classes"] == 10

    # side by side
    assert main(["compare", str(out), str(zout)]) == 0
    table = capsys.readouterr().out
    assert "exact/text_to_image/R@1" in table and "acc1" in table
    assert main(["--compare", str(out), str(out)]) == 0


def test_plots(trained_demo_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "train.png"
    assert main(["plot", str(trained_demo_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_is_a_clear_error(
    trained_demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert main(["plot", str(trained_demo_run), "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install 'clipforge[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["retrieval", "--model", "/nonexistent", "--data", "x"], "does not exist"),
        (["retrieval", "--model", "{run}", "--data", "/nonexistent-dir"], "nonexistent"),
        (["retrieval", "--model", "{run}", "--data", "{demo}", "--k", "0"], "K values"),
        (
            ["retrieval", "--model", "{run}", "--data", "{demo}", "--query-field", "nope"],
            "sample 0000000000: its .json has no text field 'nope'",
        ),
        (
            ["zeroshot", "--model", "{run}", "--data", "{demo}", "--classnames", "nofile"],
            "not a file",
        ),
        (["compare", "/nonexistent.json"], "does not exist"),
        (["index", "--index", "/nonexistent"], "index"),
    ],
)
def test_bad_input_is_exit_2_without_traceback(
    argv: list[str], message: str, trained_demo_run: Path, demo: Path, capsys
) -> None:
    argv = [a.format(run=trained_demo_run, demo=demo) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge-eval: error: ") and message in err
    assert "Traceback" not in err


def test_result_json_is_written_atomically(tmp_path: Path) -> None:
    from clipforge.eval.report import make_report, write_report

    out = tmp_path / "deep" / "r.json"
    write_report(out, make_report("retrieval", {"exact": {}}, command=["x"]))
    assert json.loads(out.read_text())["format"] == "clipforge-eval/1"
    assert [p.name for p in out.parent.iterdir()] == ["r.json"]  # no temp file left


def test_plain_open_clip_weights_with_a_model_name(demo: Path, tmp_path: Path) -> None:
    import torch

    from clipforge.pretrain.config import ModelConfig
    from clipforge.pretrain.models import build_model

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="clipforge-tiny"))
    weights = tmp_path / "plain.pt"
    torch.save(model.state_dict(), weights)  # what open_clip's own training code exports
    out = tmp_path / "r.json"
    argv = [
        "retrieval", "--model", str(weights), "--model-name", "clipforge-tiny",
        "--data", str(demo), "--limit", "64", "--json", str(out), "--workers", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    report = read_report(out)
    assert report["model"]["name"] == "clipforge-tiny"
    assert report["metrics"]["exact"]["text_to_image"]["queries"] == 64
    # without the name, a bare weights file cannot be loaded: a clean error
    assert main(["retrieval", "--model", str(weights), "--data", str(demo)]) == 2
