"""``clipforge-index`` command line: search output, error handling, help texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.index.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_search_text_prints_a_table_and_json(
    demo_index: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = _run(["search", "--index", str(demo_index), "--text", "red heart", "-k", "3"],
                      capsys)  # fmt: skip
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "text query 'red heart' -> image (3 hits)"
    assert lines[1].split() == ["rank", "score", "key", "caption", "source"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["1", "2", "3"]

    rc, out, _ = _run(["search", "--index", str(demo_index), "--text", "red heart", "-k", "3",
                       "--json"], capsys)  # fmt: skip
    assert rc == 0
    result = json.loads(out)
    assert result["query"] == "red heart" and result["target"] == "image"
    assert len(result["hits"]) == 3
    assert set(result["hits"][0]) >= {"key", "caption", "score", "source", "shard", "id"}


def test_search_by_image_against_captions(
    demo_index: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    from clipforge.index.emb_dir import read_member_bytes

    row = pq.read_table(demo_index / "metadata.parquet").slice(7, 1).to_pylist()[0]
    img = tmp_path / row["member"]
    img.write_bytes(read_member_bytes(row["shard"], row["offset"], row["size"]))
    rc, out, _ = _run(["search", "--index", str(demo_index), "--image", str(img), "--target",
                       "text", "--text", "smile", "-k", "2", "--json"], capsys)  # fmt: skip
    assert rc == 0
    results = json.loads(out)
    assert [(r["type"], r["target"]) for r in results] == [("text", "text"), ("image", "text")]
    assert all(len(r["hits"]) == 2 for r in results)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["search", "--index", "{missing}", "--text", "x"], "not a clipforge index directory"),
        (["search", "--index", "{index}", "--text", "x", "-k", "0"], "k must be >= 1"),
        (["search", "--index", "{index}", "--text", "x", "-k", "5000"], "exceeds"),
        (["search", "--index", "{index}"], "give a query"),
        (["search", "--index", "{index}", "--image", "{missing}"], "does not exist"),
        (["embed", "--model", "{missing}", "--data", "{demo}", "--out", "{tmp}/e"],
         "does not exist"),
        (["embed", "--model", "{run}", "--data", "{missing}", "--out", "{tmp}/e"],
         "no such shard"),
        (["build", "--embeddings", "{missing}", "--out", "{tmp}/i"], "not an embeddings"),
        (["build", "--embeddings", "{emb}", "--out", "{tmp}/i", "--kind", "bogus"],
         "unknown index kind"),
        (["embed", "--model", "{run}", "--data", "{demo}", "--out", "{tmp}/e", "--modalities",
          "audio"], "expected image, text"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_with_exit_code_2(
    argv: list[str],
    message: str,
    demo_index: Path,
    demo_emb: Path,
    trained_run: Path,
    demo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    subs = {"missing": str(tmp_path / "missing"), "index": str(demo_index), "tmp": str(tmp_path),
            "run": str(trained_run), "demo": str(demo), "emb": str(demo_emb)}  # fmt: skip
    rc, _, err = _run([a.format(**subs) for a in argv], capsys)
    assert rc == 2
    assert "Traceback" not in err
    assert "clipforge-index: error:" in err and message in err, err


@pytest.mark.parametrize("command", ["bench", "bench-embed"])
def test_benchmarks_are_not_product_subcommands(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The peer benchmarks moved to the repository's benchmarks/ (python -m benchmarks....)."""
    rc, _, err = _run([command, "--help"], capsys)
    assert rc == 2 and "invalid choice" in err, err


def test_build_tunes_with_held_out_queries_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from tests.test_index.synthetic import clustered_vectors, write_synthetic_embeddings

    emb = write_synthetic_embeddings(
        tmp_path / "emb", part_counts=(600, 400), modalities=("image",)
    )
    # an image-only collection has no cross-modal queries: the build says what to pass
    assert main(["build", "--embeddings", str(emb), "--out", str(tmp_path / "a")]) == 2
    assert "pass held-out queries" in capsys.readouterr().err
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((40, 32)).astype(np.float32)
    queries = clustered_vectors(rng, 50, centres / np.linalg.norm(centres, axis=1)[:, None], 0.75)
    np.save(tmp_path / "q.npy", queries)
    argv = ["build", "--embeddings", str(emb), "--out", str(tmp_path / "b"),
            "--tune-queries", f"image={tmp_path / 'q.npy'}"]  # fmt: skip
    assert main(argv) == 0
    info = json.loads((tmp_path / "b" / "index.json").read_text())["modalities"]["image"]
    assert "q.npy" in info["recall_queries"] and info["num_recall_queries"] == 50
    with pytest.raises(SystemExit) as exit_info:  # an argparse usage error
        main([*argv[:5], "--tune-queries", "video=x.npy"])
    assert exit_info.value.code == 2
    assert "--tune-queries wants image=PATH.npy" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["embed", "build", "search"])
def test_every_option_has_help_that_shows_its_default(command: str) -> None:
    """Each option of these subcommands says what it does; each optional one also says what
    happens when it is not given (its default value, or in words for flags and None)."""
    import argparse

    from clipforge.index.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    options = [
        a for a in p._actions if a.option_strings and not isinstance(a, argparse._HelpAction)
    ]
    assert options
    for action in options:
        name = "/".join(action.option_strings)
        assert action.help and action.help.strip(), f"{command} {name}: no help text"
        if action.required:
            continue
        rendered = action.help % {**vars(action), "default": action.default, "prog": command}
        assert "default" in rendered, f"{command} {name}: help does not show the default"
        if action.default not in (None, False, True, []) and not isinstance(action.default, tuple):
            assert str(action.default) in rendered, f"{command} {name}: {rendered!r}"
    text = p.format_help()  # what the user sees: renders without a formatting error
    assert all(s in text for a in options for s in a.option_strings)
