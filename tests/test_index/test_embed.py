"""``clipforge.index.embed``: the EMB_DIR layout, alignment, offsets, ranks, resume, skips."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.data_tools.images import to_rgb
from clipforge.data_tools.shardformat import (
    IMAGE_MEMBER_EXTENSIONS,
    is_remote,
    split_member_name,
)
from clipforge.index.embed import (
    EmbedConfig,
    EmbedError,
    embed,
    iter_parts,
    marker_path,
    read_member_bytes,
)
from clipforge.pretrain.models import LoadedModel
from tests.ports import free_port

from .conftest import EMBED_BATCH

REPO = Path(__file__).resolve().parents[2]


def _scan_image_members(url: str) -> list[tuple[str, str, int, int]] | None:
    """The oracle for embed's recorded offsets: an independent pass over the tar headers giving
    ``(key, member, data_offset, size)`` per sample of a local uncompressed tar, in order.

    Reads only the tar headers (``tarfile`` seeks over member data), so it costs a few ms per
    thousand samples. ``member`` is the image member the reader decodes (the first of
    :data:`IMAGE_MEMBER_EXTENSIONS` present), or ``""`` with offset/size -1 when the sample has
    none. Samples are grouped by consecutive key exactly as the reader groups them. Returns None
    for remote or compressed shards, where byte offsets cannot be served by random access; a
    truncated tar yields the samples whose headers could be read.
    """
    if is_remote(url):
        return None
    groups: list[tuple[str, dict[str, tuple[str, int, int]]]] = []
    try:
        with tarfile.open(url, mode="r:") as tar:  # "r:" refuses compressed tars: no offsets
            while True:
                try:
                    info = tar.next()
                except (tarfile.TarError, OSError, EOFError):
                    break  # truncated: keep what was read, the rest gets -1
                if info is None:
                    break
                if not info.isfile():
                    continue
                key, ext = split_member_name(info.name)
                if not ext or key.rsplit("/", 1)[-1].startswith("__"):
                    continue
                if not groups or groups[-1][0] != key:
                    groups.append((key, {}))
                groups[-1][1][ext.lower()] = (info.name, info.offset_data, info.size)
    except (tarfile.ReadError, tarfile.CompressionError):
        return None
    out = []
    for key, members in groups:
        ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
        name, offset, size = members[ext] if ext is not None else ("", -1, -1)
        out.append((key, name, offset, size))
    return out


def _read_all(emb: Path) -> tuple[dict, dict[str, np.ndarray], list[dict]]:
    manifest = json.loads((emb / "embeddings.json").read_text())
    arrays: dict[str, list[np.ndarray]] = {m: [] for m in manifest["modalities"]}
    rows: list[dict] = []
    for _, arr, meta in iter_parts(emb):
        for m, a in arr.items():
            arrays[m].append(np.asarray(a))
        rows.extend(meta.to_pylist())
    return manifest, {m: np.concatenate(a) for m, a in arrays.items()}, rows


def _shard_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def test_embed_writes_aligned_normalised_embeddings_and_manifest(
    demo_emb: Path, demo: Path, trained_model: LoadedModel, trained_run: Path
) -> None:
    manifest, arrays, rows = _read_all(demo_emb)
    assert manifest["format"] == "clipforge-embeddings/1"
    assert manifest["model_hash"] == trained_model.model_hash
    assert manifest["model_source"] == str(trained_run.resolve())
    assert manifest["dim"] == 64 and manifest["dtype"] == "float16"
    assert manifest["modalities"] == ["image", "text"]
    assert manifest["count"] == 1911 == len(rows)
    assert [p["part"] for p in manifest["parts"]] == list(range(8))  # one part per shard
    assert sum(p["count"] for p in manifest["parts"]) == 1911
    assert manifest["skipped"] == {} and manifest["data"] == str(demo)
    for p in manifest["parts"]:
        assert marker_path(demo_emb, p["part"]).is_file()
    for m in ("image", "text"):
        assert arrays[m].shape == (1911, 64) and arrays[m].dtype == np.float16
        norms = np.linalg.norm(arrays[m].astype(np.float32), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert set(rows[0]) == {"key", "caption", "shard", "member", "offset", "size", "source"}

    # every sample of every shard exactly once, with its caption and .json source
    expected = {}
    for shard in sorted(demo.glob("*.tar")):
        for key, members in _shard_samples(shard).items():
            expected[key] = (str(shard.resolve()), members["txt"].decode().strip(),
                             json.loads(members["json"])["source"])  # fmt: skip
    assert sorted(r["key"] for r in rows) == sorted(expected)
    for r in rows:
        assert (r["shard"], r["caption"], r["source"]) == expected[r["key"]]

    # row i of the .npy files is sample i of the metadata: recompute a few directly
    per_sample, per_batch = trained_model.image_transforms()
    picks = [0, 500, 1910]
    with torch.inference_mode():
        imgs = []
        for i in picks:
            data = read_member_bytes(rows[i]["shard"], rows[i]["offset"], rows[i]["size"])
            imgs.append(per_sample(to_rgb(Image.open(io.BytesIO(data)))))
        img = F.normalize(trained_model.model.encode_image(per_batch(torch.stack(imgs))), dim=-1)
        txt = trained_model.tokenizer([rows[i]["caption"] for i in picks])
        txt = F.normalize(trained_model.model.encode_text(txt), dim=-1)
    np.testing.assert_allclose(arrays["image"][picks].astype(np.float32), img.numpy(), atol=2e-3)
    np.testing.assert_allclose(arrays["text"][picks].astype(np.float32), txt.numpy(), atol=2e-3)


def test_member_offsets_read_back_the_exact_image_bytes(demo_emb: Path, demo: Path) -> None:
    _, _, rows = _read_all(demo_emb)
    originals = {}
    for shard in demo.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for info in tar:
                if info.name.endswith((".webp", ".png", ".jpg")):
                    originals[(str(shard.resolve()), info.name)] = tar.extractfile(info).read()
    assert len(originals) == 1911
    for r in rows:
        assert r["member"].startswith(r["key"] + ".")
        data = read_member_bytes(r["shard"], r["offset"], r["size"])
        assert data == originals[(r["shard"], r["member"])], r


def test_scan_of_compressed_or_remote_shards_gives_no_offsets(tmp_path: Path, demo: Path) -> None:
    import gzip

    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress((demo / "emoji-000000.tar").read_bytes()))
    assert _scan_image_members(str(gz)) is None
    assert _scan_image_members("pipe:cat x.tar") is None
    scan = _scan_image_members(str(demo / "emoji-000000.tar"))
    assert scan is not None and len(scan) == 240 and scan[0][1].endswith(".webp")
    with pytest.raises(EmbedError, match="no byte offset"):
        read_member_bytes(str(gz), -1, -1)


def test_recorded_members_match_a_header_scan_and_compressed_shards_get_none(
    demo: Path, trained_model: LoadedModel, tmp_path: Path
) -> None:
    import gzip

    plain = str(demo / "emoji-000000.tar")
    gz = tmp_path / "emoji-000000.tar.gz"
    gz.write_bytes(gzip.compress((demo / "emoji-000000.tar").read_bytes()))
    for shard, expected in ((plain, _scan_image_members(plain)), (str(gz), None)):
        out = tmp_path / f"emb-{Path(shard).name}"
        cfg = EmbedConfig(model="m", data=shard, out=str(out), workers=0, progress="none",
                          modalities=("image",), dtype="float32")  # fmt: skip
        embed(cfg, loaded=trained_model)
        meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
        got = [(r["key"], r["member"], r["offset"], r["size"]) for r in meta]
        if expected is None:  # no random access into a compressed shard
            assert len(got) == 240 and all(r[1:] == ("", -1, -1) for r in got)
        else:  # the one-pass record equals the separate header scan, row for row
            assert got == expected


def _bad_shard(demo: Path, out: Path) -> Path:
    """The first 20 samples of a demo shard with sample 3's image garbled and sample 7's
    caption missing."""
    out.mkdir(parents=True, exist_ok=True)
    dst = out / "bad-000000.tar"
    with tarfile.open(demo / "emoji-000000.tar") as src, tarfile.open(dst, "w") as tar:
        for n, info in enumerate(src):
            if n >= 60:
                break
            data = src.extractfile(info).read()
            if info.name.startswith("0000000003.") and info.name.endswith(".webp"):
                data = b"not an image" + data[:100]
            if info.name == "0000000007.txt":
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def test_embed_counts_skipped_samples_and_keeps_offsets_right(
    demo: Path, trained_model: LoadedModel, tmp_path: Path
) -> None:
    shard = _bad_shard(demo, tmp_path / "bad")
    out = tmp_path / "emb"
    cfg = EmbedConfig(model="m", data=str(shard), out=str(out), workers=0, progress="none",
                      modalities=("image",), dtype="float32")  # fmt: skip
    result = embed(cfg, loaded=trained_model)
    assert result.manifest is not None
    assert result.manifest["count"] == 18
    assert result.manifest["skipped"] == {"corrupt_image": 1, "missing_caption": 1}
    assert result.manifest["modalities"] == ["image"]
    assert not (out / "text_emb").exists()
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
    keys = [r["key"] for r in meta]
    assert "0000000003" not in keys and "0000000007" not in keys and len(keys) == 18
    with tarfile.open(shard) as tar:
        for r in meta:
            assert read_member_bytes(shard, r["offset"], r["size"]) == (
                tar.extractfile(r["member"]).read()
            )
    img = np.load(out / "img_emb" / "img_emb_0.npy")
    assert img.shape == (18, 64) and img.dtype == np.float32


def test_embed_counts_the_samples_a_truncated_shard_lost(
    demo: Path, trained_model: LoadedModel, tmp_path: Path
) -> None:
    """A shard cut in half under a manifest that knows its size: the samples lost are counted
    (manifest count - rows embedded), not 1."""
    data = tmp_path / "data"
    data.mkdir()
    shard = data / "emoji-000000.tar"
    whole = (demo / "emoji-000000.tar").read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    manifest = json.loads((demo / "manifest.json").read_text())
    manifest["shards"] = [s for s in manifest["shards"] if s["name"] == shard.name]
    (data / "manifest.json").write_text(json.dumps(manifest))
    expected = manifest["shards"][0]["samples"]
    cfg = EmbedConfig(model="m", data=str(data), out=str(tmp_path / "emb"), workers=0,
                      progress="none", modalities=("image",), dtype="float32")  # fmt: skip
    result = embed(cfg, loaded=trained_model)
    assert result.manifest is not None
    count = result.manifest["count"]
    assert 0 < count < expected
    assert result.manifest["skipped"] == {"truncated_shard": expected - count}


def test_embed_refuses_to_mix_parts_of_another_model(
    demo: Path, demo_emb: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    shutil.copytree(demo_emb, out)
    cfg = EmbedConfig(model=str(other_model_dir), data=str(demo), out=str(out), workers=0,
                      progress="none")  # fmt: skip
    with pytest.raises(EmbedError, match="model_hash"):
        embed(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_asked_without_a_gpu_is_an_error_not_a_cpu_run(demo: Path, tmp_path: Path) -> None:
    cfg = EmbedConfig(model="x", data=str(demo), out=str(tmp_path / "e"), device="cuda")
    with pytest.raises(EmbedError, match="no CUDA device"):
        embed(cfg)
    assert not (tmp_path / "e").exists()


def _embed_cmd(run: Path, data: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "clipforge.index", "embed", "--model", str(run), "--data",
            data, "--out", str(out), "--batch-size", str(EMBED_BATCH), "--progress", "lines",
            *extra]  # fmt: skip


def test_two_rank_gloo_embed_writes_each_sample_exactly_once(
    demo: Path, demo_emb: Path, trained_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    data = str(demo / "emoji-{000000..000004}.tar")  # 5 parts: rank 0 gets 3, rank 1 gets 2
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        cmd = _embed_cmd(trained_run, data, out, "--workers", "0")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "embedded 1200 samples" in outputs[0]  # rank 0 reports the whole collection

    manifest, arrays, rows = _read_all(out)
    assert manifest["count"] == 1200 and [p["part"] for p in manifest["parts"]] == list(range(5))
    keys = [(r["shard"], r["key"]) for r in rows]
    assert len(set(keys)) == len(keys) == 1200
    # the same rows, in the same order, as the single-process run of those shards
    _, ref_arrays, ref_rows = _read_all(demo_emb)
    n = len(rows)
    assert [(r["shard"], r["key"]) for r in ref_rows[:n]] == keys
    for m in ("image", "text"):
        np.testing.assert_allclose(arrays[m].astype(np.float32),
                                   ref_arrays[m][:n].astype(np.float32), atol=2e-3)  # fmt: skip


def test_resume_after_a_killed_embed_keeps_complete_parts_and_matches(
    demo: Path, demo_emb: Path, trained_run: Path, trained_model: LoadedModel, tmp_path: Path
) -> None:
    out = tmp_path / "emb"
    data = str(demo / "emoji-{000000..000003}.tar")  # 4 parts
    cmd = _embed_cmd(trained_run, data, out, "--workers", "0")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not marker_path(out, 1).exists():  # two parts complete, the third under way
            assert proc.poll() is None, "embed ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "embeddings.json").exists(), "killed too late: nothing left to resume"
    complete = sorted(int(p.stem.split("_")[1]) for p in (out / "parts").glob("part_*.json"))
    assert complete[:2] == [0, 1] and len(complete) < 4
    mtimes = {f: f.stat().st_mtime_ns for f in out.rglob("*_0.*")}  # part 0's files + marker
    assert len(mtimes) == 4

    # Also leave the debris of a partial part: a data file with no marker and a stale temp.
    partial = 3
    shutil.copy(demo_emb / "img_emb" / "img_emb_0.npy", out / "img_emb" / f"img_emb_{partial}.npy")
    (out / "text_emb" / f"text_emb_{partial}.npy.tmp-999999").write_bytes(b"half")

    # two workers this time: parts come out the same whichever worker reads them
    cfg = EmbedConfig(model=str(trained_run), data=data, out=str(out), workers=2,
                      batch_size=EMBED_BATCH, progress="none")  # fmt: skip
    result = embed(cfg, loaded=trained_model)
    assert sorted(result.parts_kept) == complete
    assert sorted(result.parts_written) == sorted(set(range(4)) - set(complete))
    assert {f: f.stat().st_mtime_ns for f in mtimes} == mtimes  # complete parts untouched
    assert not list(out.rglob("*.tmp-*"))

    # identical to the uninterrupted run of the same shards
    manifest, arrays, rows = _read_all(out)
    ref_manifest, ref_arrays, ref_rows = _read_all(demo_emb)
    assert manifest["count"] == 960
    assert manifest["parts"] == ref_manifest["parts"][:4]
    assert rows == ref_rows[:960]
    for m in ("image", "text"):
        assert np.array_equal(arrays[m], ref_arrays[m][:960]), m
