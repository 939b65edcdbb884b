"""Failed ``embed`` / ``build`` runs: one error line, exit code 2, and nothing left behind.

A full disk (a real small tmpfs where this machine allows mounting one, else a simulated one)
names the file and the space left; a re-run after space is freed resumes. A missing or invalid
input creates nothing, and an existing index in ``--out`` survives a failed rebuild.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from clipforge.data_tools import atomic
from clipforge.index.cli import main
from clipforge.index.searcher import Searcher
from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.models import build_model, export_open_clip

from .synthetic import write_synthetic_embeddings

Mount = Callable[[str], Path]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained clipforge-tiny exported as RUN/model (enough to embed with, in a second)."""
    model, cfg = build_model(ModelConfig())
    return export_open_clip(model, cfg, tmp_path_factory.mktemp("random") / "model")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``mount(size)``: a real tmpfs of that size (re-mounted larger when called again), for
    out-of-space tests; skipped where this process cannot mount (needs root)."""
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount")
    mounted = False

    def mount(size: str) -> Path:
        nonlocal mounted
        opts = f"remount,size={size}" if mounted else f"size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)],
                           capture_output=True)  # fmt: skip
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted = True
        return mnt

    try:
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- a full disk


def test_embed_on_a_full_disk_fails_cleanly_and_resumes(
    tmpfs: Mount, demo: Path, random_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 4 shards of float32 embeddings, image + text, dim 64: ~0.5 MB; the disk holds 200 kB
    mnt = tmpfs("200k")
    out = mnt / "emb"
    shards = str(demo / "emoji-{000000..000003}.tar")
    argv = ["embed", "--model", str(random_model), "--data", shards, "--out", str(out),
            "--dtype", "float32", "--workers", "0", "--batch-size", "64",
            "--progress", "none"]  # fmt: skip
    rc, err = _run(argv, capsys)
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clipforge-index: error: "), err
    assert f"{out}/" in err and "no space left on the device" in err and "MB free on" in err, err
    assert str(mnt) in err and ".tmp-" not in err
    # nothing half-written: no temporary file, no data file without its part's marker
    files = _tree(out)
    assert not [f for f in files if ".tmp-" in f], files
    markers = [json.loads((out / f).read_text()) for f in files if f.startswith("parts/")]
    recorded = {rel for m in markers for rel in m["files"]}
    data = {f for f in files if f.endswith((".npy", ".parquet"))}
    assert data == recorded and "embeddings.json" not in files
    assert 1 <= len(markers) < 4, files  # it started, then ran out of space

    mnt = tmpfs("64m")  # space freed: the same command resumes
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    manifest = json.loads((out / "embeddings.json").read_text())
    assert manifest["count"] == 960 and len(manifest["parts"]) == 4
    assert manifest["model"]["linked"] is False  # another file system: copied
    assert (out / "model" / "open_clip_pytorch_model.bin").stat().st_size > 1e6


def test_build_on_a_full_disk_fails_cleanly_and_resumes(
    tmpfs: Mount, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(3000, 2000), dim=32)
    mnt = tmpfs("300k")  # the metadata fits, the 640 kB of flat indexes do not
    out = mnt / "index"
    argv = ["build", "--embeddings", str(emb), "--out", str(out), "--kind", "flat"]
    rc, err = _run(argv, capsys)
    assert rc == 2 and "Traceback" not in err, err
    assert "no space left on the device" in err and f"{out}/" in err, err
    assert ".build-tmp" not in err  # the name the file was to have, not its staging name
    assert _tree(mnt) == []  # the run made OUT: it removed it
    tmpfs("8m")
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    assert Searcher.open(out).count == 5000 and ".build-tmp" not in " ".join(_tree(out))


def test_faiss_write_on_a_nearly_full_disk_is_out_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Where no tmpfs can be mounted: FAISS reports a full disk as a bare RuntimeError; with
    little space left it is an out-of-space error too, and the build leaves nothing."""
    import faiss

    emb = write_synthetic_embeddings(tmp_path / "emb", part_counts=(300,), dim=16)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: usage._replace(free=8192))

    def full_write(index: faiss.Index, path: str) -> None:
        Path(path).write_bytes(b"\0" * 100)
        raise RuntimeError(f"Error in faiss::FileIOWriter: write error on {path}")

    monkeypatch.setattr(faiss, "write_index", full_write)
    out = tmp_path / "a" / "index"
    rc, err = _run(["build", "--embeddings", str(emb), "--out", str(out), "--kind", "flat"], capsys)
    assert rc == 2 and "Traceback" not in err
    assert f"{out / 'image.index'}: no space left on the device" in err and "0.0 MB free" in err
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- bad input


def test_embed_with_a_missing_input_creates_nothing(
    demo: Path, random_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = str(demo / "emoji-000000.tar")
    for argv, message in [
        (["--model", str(tmp_path / "nope"), "--data", shards], "does not exist"),
        (["--model", str(random_model), "--data", str(tmp_path / "nope")], "no such shard"),
    ]:
        rc, err = _run(["embed", *argv, "--out", str(tmp_path / "new" / "e")], capsys)
        assert rc == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / "new").exists()
    # an existing EMB_DIR: what was there before stays, nothing is added
    old = tmp_path / "old"
    (old / "img_emb").mkdir(parents=True)
    (old / "notes.txt").write_text("mine")
    rc, _ = _run(["embed", "--model", str(tmp_path / "nope"), "--data", shards, "--out", str(old)],
                 capsys)  # fmt: skip
    assert rc == 2 and _tree(old) == ["img_emb", "notes.txt"]


def test_embed_failing_after_it_started_removes_the_folders_it_made(
    demo: Path,
    random_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from clipforge.index import embed

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(embed, "_write_part_files", broken)  # the first part's write fails
    out = tmp_path / "new" / "e"
    argv = ["embed", "--model", str(random_model), "--data", str(demo / "emoji-000000.tar"),
            "--out", str(out), "--workers", "0", "--progress", "none"]  # fmt: skip
    rc, err = _run(argv, capsys)
    assert rc == 2 and "Input/output error" in err
    assert not (tmp_path / "new").exists()


def test_build_with_a_missing_or_invalid_emb_dir_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write_synthetic_embeddings(tmp_path / "good", part_counts=(300, 200), dim=16)
    no_meta = write_synthetic_embeddings(tmp_path / "no-meta", part_counts=(300, 200), dim=16)
    (no_meta / "metadata" / "metadata_1.parquet").unlink()
    no_npy = write_synthetic_embeddings(tmp_path / "no-npy", part_counts=(300, 200), dim=16)
    (no_npy / "text_emb" / "text_emb_0.npy").unlink()
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "embeddings.json").write_text("{")
    np.save(tmp_path / "q.npy", np.ones((5, 8), np.float32))  # wrong dimension
    cases = [
        ([str(tmp_path / "nope")], "not an embeddings directory"),
        ([str(bad_json)], "embeddings.json"),
        ([str(no_meta)], "metadata part file missing"),
        ([str(no_npy)], "embedding part file missing"),
        ([str(good), "--tune-queries", f"image={tmp_path / 'q.npy'}"], "does not match"),
    ]
    for args, message in cases:
        out = tmp_path / "new" / "index"
        rc, err = _run(["build", "--embeddings", *args, "--out", str(out)], capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)
        assert not (tmp_path / "new").exists(), args
    # an index already in --out survives a failed rebuild, unchanged and searchable
    out = tmp_path / "index"
    assert main(["build", "--embeddings", str(good), "--out", str(out), "--kind", "flat"]) == 0
    before = {f: (out / f).read_bytes() for f in _tree(out)}
    for args, _ in cases:
        assert main(["build", "--embeddings", *args, "--out", str(out)]) == 2
    assert {f: (out / f).read_bytes() for f in _tree(out)} == before
    assert Searcher.open(out).count == 500
