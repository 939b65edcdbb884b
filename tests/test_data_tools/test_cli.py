"""``clipforge-data`` end to end: write with options, demo + verify + stats, clear errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from clipforge.data_tools.cli import main

from .shard_helpers import all_samples, make_folder_source


def test_write_command_applies_its_options_and_reports_what_it_did(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_folder_source(tmp_path / "src", 5, size=(30, 10))
    (tmp_path / "src" / "img001.txt").write_text("   \n")  # one blank caption
    out = tmp_path / "out"
    code = main(
        [
            "write",
            str(tmp_path / "src"),
            str(out),
            "--image-size",
            "12",
            "--resize-mode",
            "pad",
            "--image-format",
            "webp",
            "--quality",
            "80",
            "--shard-size",
            "2",
            "--workers",
            "2",
            "--prefix",
            "train",
            "--background",
            "0,0,255",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        f"4 samples in 3 shards (3 written, 0 already complete) -> {out / 'manifest.json'}",
        '1 of 5 inputs skipped: {"empty_caption": 1}',
    ]
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    for members in all_samples(out).values():
        img = Image.open(io.BytesIO(members["webp"]))
        assert (img.format, img.size) == ("WEBP", (12, 12))
        # a 30x10 image padded to a square: the top row is the blue background
        r, g, b = img.convert("RGB").getpixel((6, 0))
        assert b > 200 and r < 40 and g < 40
    writer = json.loads((out / "manifest.json").read_text())["writer"]
    assert (writer["resize_mode"], writer["quality"], writer["background"]) == (
        "pad",
        80,
        [0, 0, 255],
    )


def test_demo_command_writes_the_1911_sample_demo_that_verifies_clean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    assert main(["demo", str(out)]) == 0
    assert "1911 samples in 8 shards" in capsys.readouterr().out
    assert len(list(out.glob("*.tar"))) == 8
    assert (out / "NOTICE").exists()
    assert json.loads((out / "manifest.json").read_text())["samples"] == 1911

    assert main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "verify: all shards clean"

    assert main(["stats", str(out), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["samples"], st["shards"], st["problems"]) == (1911, 8, 0)
    # the shipped stats.json agrees with a fresh scan
    assert json.loads((out / "stats.json").read_text())["samples"] == 1911

    # running it again keeps the shards (same content, nothing rewritten)
    before = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert main(["demo", str(out)]) == 0
    assert {p.name: p.stat().st_ino for p in out.glob("*.tar")} == before


def test_bad_arguments_exit_2_with_a_message_naming_the_file_or_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nothing.csv"
    assert main(["write", str(missing), str(tmp_path / "out")]) == 2
    assert (
        f"clipforge-data write: error: source {missing} does not exist" in capsys.readouterr().err
    )

    table = tmp_path / "t.csv"
    table.write_text("path,text\nx.png,hi\n")
    assert main(["write", str(table), str(tmp_path / "out"), "--caption-column", "alt"]) == 2
    err = capsys.readouterr().err
    assert "t.csv: no caption column 'alt'; columns are ['path', 'text']" in err

    assert main(["write", str(table), str(tmp_path / "out"), "--quality", "0"]) == 2
    assert "quality must be in 1..100, got 0" in capsys.readouterr().err

    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "empty: no such shard file(s)" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:
        main(["write", str(table), str(tmp_path / "out"), "--part", "2/2"])
    assert exit_info.value.code == 2
    assert "--part 2/2: need 0 <= I < N" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["write", str(table), str(tmp_path / "out"), "--background", "red"])
    assert "--background wants R,G,B in 0..255, got 'red'" in capsys.readouterr().err


def test_write_refuses_a_source_with_no_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty_folder").mkdir()
    assert main(["write", str(tmp_path / "empty_folder"), str(tmp_path / "out")]) == 2
    assert "holds no images (nothing to write)" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()
