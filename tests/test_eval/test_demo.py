"""``clipforge-demo``: every stage runs and prints its figures; a second run reuses everything; a
fresh run trains from scratch (a few steps here; the demo's own recipe takes ~2 minutes, too long
for the suite)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from clipforge.eval.demo import EXAMPLE_QUERIES, FREE_FORM_QUERIES, DemoConfig, main


def _hits(out: str) -> dict[str, list[str]]:
    """Example query -> the captions printed under it."""
    found: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        m = re.fullmatch(r'\s+"(.+)"', line)
        if m:
            current = found.setdefault(m.group(1), [])
        elif current is not None and (m := re.fullmatch(r"\s+\d\. \d\.\d{3}  (.+)", line)):
            current.append(m.group(1))
        else:
            current = None
    return found


def test_demo_on_a_trained_run_then_everything_reused(
    trained_demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    # The session's trained model stands in for stage 2 (conftest's 400-step recipe, shorter than
    # the demo's and without its caption policy): the demo must take it as complete and run the
    # later stages on it.
    shutil.copytree(trained_demo_run, out / "run")
    assert main(["--out", str(out), "--steps", "400"]) == 0
    first = capsys.readouterr().out
    assert f"run directory {out}" in first
    for n in range(1, 7):
        assert f"[{n}/6]" in first
    assert "already trained" in first
    assert "1911 samples in 8 shards" in first
    assert re.search(r"8 part\(s\) embedded, 0 kept", first)
    assert "text to image" in first and "image to text" in first and "R@10" in first
    assert f"clipforge-index serve --index {out / 'index'}" in first and "--serve" in first
    report = json.loads((out / "retrieval.json").read_text())
    exact = report["metrics"]["exact"]["text_to_image"]
    assert exact["queries"] == 1911 and exact["R@10"] > 0.6, exact  # measured ~0.96
    via_index = report["metrics"]["index"]["text_to_image"]
    assert via_index["R@10"] == pytest.approx(exact["R@10"], abs=0.01)  # a flat index is exact
    names = report["metrics"]["exact"]["name_to_image"]  # each emoji's name alone as the query
    assert names["queries"] == 1911 and names["R@10"] > 0.3, names
    assert "name to image" in first
    assert "querying by the emoji's name alone (1911 names against every image): R@1 " in first
    hits = _hits(first)
    assert list(hits) == [*EXAMPLE_QUERIES, *FREE_FORM_QUERIES]
    assert all(len(h) == 5 for h in hits.values())
    free_form = first.split("free-form queries: no emoji is named like this")[1]
    assert all(f'"{q}"' in free_form for q in FREE_FORM_QUERIES)
    assert (out / "index" / "index.json").is_file()

    ckpt_times = {p: p.stat().st_mtime_ns for p in (out / "run" / "checkpoints").iterdir()}
    assert main(["--out", str(out), "--steps", "400"]) == 0
    second = capsys.readouterr().out
    assert "already trained" in second
    assert re.search(r"0 part\(s\) embedded, 8 kept", second)
    assert "reusing" in second.split("[4/6]")[1].split("[5/6]")[0]
    assert "reused report" in second
    assert _hits(second) == hits
    assert {p: p.stat().st_mtime_ns for p in (out / "run" / "checkpoints").iterdir()} == ckpt_times


def test_demo_from_scratch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fresh"
    assert main(["--out", str(out), "--steps", "3", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "trained to step 3" in text
    # the demo's recipe reaches the trainer (the resolved config it saved)
    saved = yaml.safe_load((out / "run" / "config.yaml").read_text())
    d = DemoConfig()
    assert saved["data"]["caption_name_only"] == d.caption_name_only > 0
    assert saved["data"]["caption_subsets"] == d.caption_subsets
    assert saved["data"]["caption_name_field"] == "name"
    assert saved["data"]["augment"] is d.augment
    assert saved["loss"]["init_logit_scale"] == d.init_logit_scale
    assert saved["optim"]["warmup_steps"] == 1  # 1% of 3 steps, at least one
    assert (out / "run" / "model" / "open_clip_config.json").is_file()
    assert (out / "run" / "checkpoints" / "step-3.pt").is_file()
    assert len(_hits(text)) == len(EXAMPLE_QUERIES) + len(FREE_FORM_QUERIES)
    assert "R@1" in text and (out / "retrieval.json").is_file()

    # A longer --steps on the finished run bends its schedule: refused in the demo's own flags
    # before anything is touched, then done deliberately with --extend-schedule.
    before = {p: p.stat().st_mtime_ns for p in (out / "run").rglob("*") if p.is_file()}
    assert main(["--out", str(out), "--steps", "5", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert "started as a 3-step run; --steps 5" in err and "--extend-schedule rewarm" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "run").rglob("*") if p.is_file()} == before
    # rewarm, not continue_lr: a 3-step run has decayed to a learning rate of 0 (its warmup is
    # one step), from which continue_lr would leave the weights, and the embeddings, as they are
    argv = ["--out", str(out), "--steps", "5", "--workers", "1", "--extend-schedule", "rewarm"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "trained to step 5" in text
    assert (out / "run" / "checkpoints" / "step-5.pt").is_file()
    # the embeddings of the 3-step model are stale: every part is embedded again
    assert re.search(r"8 part\(s\) embedded, 0 kept", text)


def test_warmup_scales_with_the_run_length() -> None:
    assert DemoConfig(steps=1000).warmup_steps == 10
    assert DemoConfig(steps=3000, warmup_fraction=0.05).warmup_steps == 150
    assert DemoConfig(steps=3).warmup_steps == 1  # never zero: the first step is warmed up
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        DemoConfig(warmup_fraction=1.0)


def test_demo_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "x"), "--steps", "0"]) == 2
    assert capsys.readouterr().err.startswith("clipforge-demo: error: steps must be >= 1")
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    assert main(["--out", str(blocked)]) == 2
    assert capsys.readouterr().err.startswith("clipforge-demo: error: ")
