"""A build split into ``--part I/N`` processes + ``--merge-parts`` (index/parts.py).

Real FAISS on generated clustered vectors: the parts' merge writes the same INDEX_DIR as a
one-machine ``--num-shards N`` build (byte-identical index files) and searches like the in-RAM
build; a part whose marker or shard is gone is redone alone; mixed parts are refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clipforge.index import parts, store
from clipforge.index.build import run_build, run_build_part, run_merge_parts
from clipforge.index.cli import main
from clipforge.index.emb_dir import open_vectors
from clipforge.index.plan import BuildConfig

from .synthetic import write_synthetic_embeddings

CFG = BuildConfig(nlist=32, chunk_size=1000)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_embeddings(
        tmp_path_factory.mktemp("emb"), part_counts=(2500, 1500, 2000), dim=24, seed=5
    )


def build_parts(emb: Path, out: Path, n: int, config: BuildConfig = CFG, **kw: object) -> None:
    for i in range(n):
        run_build_part(emb, out, i, n, kind="ivf_sqfp16", config=config, log=quiet, **kw)


def search(index_dir: Path, modality: str, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nq, 10) distances and ids at several nprobe, stacked."""
    opened = store.open_index(index_dir, modality)
    ds, ids = [], []
    for nprobe in (1, 4, 32):
        store.apply_search_params(opened.index, {"nprobe": nprobe})
        d, i = opened.index.search(q, 10)
        ds.append(d)
        ids.append(i)
    return np.stack(ds), np.stack(ids)


def test_two_parts_and_merge_equal_one_machine_builds(emb_dir: Path, tmp_path: Path) -> None:
    one = tmp_path / "one"
    ram = tmp_path / "ram"
    split = tmp_path / "split"
    a = run_build(emb_dir, one, kind="ivf_sqfp16", num_shards=2, config=CFG, log=quiet)
    run_build(emb_dir, ram, kind="ivf_sqfp16", config=CFG, log=quiet)
    build_parts(emb_dir, split, 2)
    names = sorted(p.name for p in (split / "parts").iterdir())
    assert names == sorted(
        f"{m}.{what}{suffix}"
        for m in ("image", "text")
        for what in ("trained.index", "part-0-of-2.index", "part-1-of-2.index")
        for suffix in ("", ".json")
    )
    b = run_merge_parts(emb_dir, split, kind="ivf_sqfp16", config=CFG, log=quiet)

    # the same INDEX_DIR, byte for byte, as a one-machine --num-shards 2 build
    assert not (split / "parts").exists()
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*"))
    assert files == sorted(p.relative_to(split).as_posix() for p in split.rglob("*"))
    for f in files:
        if f != "index.json":
            assert (one / f).read_bytes() == (split / f).read_bytes(), f
    timing = {"build_seconds"}
    for m in ("image", "text"):
        ea, eb = a["modalities"][m], b["modalities"][m]
        assert {k: v for k, v in ea.items() if k not in timing} == {
            k: v for k, v in eb.items() if k not in timing
        }
        assert eb["num_shards"] == 2 and eb["extra_files"] == [f"{m}.ivfdata"]
    assert {k: v for k, v in a.items() if k not in timing | {"modalities"}} == {
        k: v for k, v in b.items() if k not in timing | {"modalities"}
    }
    # and searches exactly like the in-RAM single build (same ids and distances)
    q = open_vectors(emb_dir, "text").sample(200, seed=3)
    for m in ("image", "text"):
        da, ia = search(ram, m, q)
        db, ib = search(split, m, q)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(da, db)


def test_killed_part_is_redone_alone(emb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_parts(emb_dir, out, 3, modalities=["image"])
    d = out / "parts"
    trained = d / "image.trained.index"
    shard = [parts.part_file(out, "image", p, 3) for p in range(3)]
    markers = [parts.marker_of(s) for s in shard]
    before = {p: p.stat().st_mtime_ns for p in [trained, *shard, *markers]}

    markers[1].unlink()  # part 1 killed after writing its shard, before its marker
    shard[2].write_bytes(shard[2].read_bytes()[:-100])  # part 2's shard truncated
    with pytest.raises(parts.PartsError, match=r"part\(s\) 1, 2 of 3 missing.*--part 1/3, "):
        run_merge_parts(emb_dir, out, kind="ivf_sqfp16", modalities=["image"], config=CFG,
                        log=quiet)  # fmt: skip

    done = [
        run_build_part(emb_dir, out, p, 3, kind="ivf_sqfp16", modalities=["image"], config=CFG,
                       log=quiet)
        for p in range(3)
    ]  # fmt: skip
    assert [r.built["image"] for r in done] == [False, True, True]
    assert done[0].trained == {"image": False}  # the quantizer is not trained again
    for p in (trained, shard[0], markers[0]):
        assert p.stat().st_mtime_ns == before[p], p  # kept untouched
    for p in (shard[1], markers[1], shard[2], markers[2]):
        assert p.stat().st_mtime_ns != before.get(p), p  # redone
    m2 = json.loads(markers[2].read_text())
    assert m2["size_bytes"] == shard[2].stat().st_size and (m2["part"], m2["num_parts"]) == (2, 3)

    run_merge_parts(emb_dir, out, kind="ivf_sqfp16", modalities=["image"], config=CFG, log=quiet)
    ref = run_build(emb_dir, tmp_path / "ref", kind="ivf_sqfp16", modalities=["image"],
                    num_shards=3, config=CFG, log=quiet)  # fmt: skip
    for f in ref["modalities"]["image"]["sha256"]:
        assert (out / f).read_bytes() == (tmp_path / "ref" / f).read_bytes()


def test_mismatched_parts_are_refused(emb_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_parts(emb_dir, a, 2, modalities=["image"])
    # b's quantizer is trained on another sample (seed): its part 1 must not join a's build
    build_parts(emb_dir, b, 2, config=BuildConfig(nlist=32, chunk_size=1000, seed=99),
                modalities=["image"])  # fmt: skip
    for f in ("image.part-1-of-2.index", "image.part-1-of-2.index.json"):
        shutil.copy(b / "parts" / f, a / "parts" / f)
    with pytest.raises(parts.PartsError, match=r"part-1-of-2.index.json was built from another "
                       "trained quantizer"):  # fmt: skip
        run_merge_parts(emb_dir, a, kind="ivf_sqfp16", modalities=["image"], config=CFG,
                        log=quiet)  # fmt: skip
    # re-running that part redoes it from a's quantizer, and the merge then goes through
    r = run_build_part(emb_dir, a, 1, 2, kind="ivf_sqfp16", modalities=["image"], config=CFG,
                       log=quiet)  # fmt: skip
    assert r.built == {"image": True}
    run_merge_parts(emb_dir, a, kind="ivf_sqfp16", modalities=["image"], config=CFG, log=quiet)


def test_other_flags_or_emb_dir_or_part_count_are_refused(emb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_parts(emb_dir, out, 2, modalities=["image"])
    with pytest.raises(parts.PartsError, match=r"other build flags: seed: 1234 -> 7"):
        run_build_part(emb_dir, out, 1, 2, kind="ivf_sqfp16", modalities=["image"],
                       config=BuildConfig(nlist=32, seed=7), log=quiet)  # fmt: skip
    with pytest.raises(parts.PartsError, match="trained for 2 parts, this step has 3"):
        run_build_part(emb_dir, out, 1, 3, kind="ivf_sqfp16", modalities=["image"],
                       config=CFG, log=quiet)  # fmt: skip
    with pytest.raises(parts.PartsError, match="other build flags: target_recall"):
        run_merge_parts(emb_dir, out, kind="ivf_sqfp16", modalities=["image"],
                        target_recall=0.8, config=CFG, log=quiet)  # fmt: skip
    other = write_synthetic_embeddings(tmp_path / "other", part_counts=(2500, 1500, 2001),
                                       dim=24, seed=5)  # fmt: skip
    with pytest.raises(parts.PartsError, match="trained from another EMB_DIR"):
        run_merge_parts(other, out, kind="ivf_sqfp16", modalities=["image"], config=CFG,
                        log=quiet)  # fmt: skip
    with pytest.raises(parts.PartsError, match="text quantizer"):
        run_merge_parts(emb_dir, out, kind="ivf_sqfp16", config=CFG, log=quiet)
    assert (out / "parts").is_dir() and not (out / "index.json").exists()


def test_waiting_part_times_out_clearly(emb_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(TimeoutError, match=r"part 0 to train the image quantizer .*--part 0/N"):
        run_build_part(emb_dir, tmp_path / "idx", 1, 2, kind="ivf_sqfp16", modalities=["image"],
                       config=CFG, wait_timeout_s=0.2, poll_s=0.05, log=quiet)  # fmt: skip


def test_markers_round_trip_and_name_a_bad_field(emb_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_parts(emb_dir, out, 2, modalities=["image"])
    path = parts.marker_of(parts.part_file(out, "image", 0, 2))
    data = json.loads(path.read_text())
    marker = parts.IndexPartMarker.from_json(data, str(path))
    assert marker.to_json() == data and (marker.start, marker.stop) == (0, 3000)
    with pytest.raises(parts.PartsError, match=r"x.json: field 'stop' has the wrong type"):
        parts.IndexPartMarker.from_json({**data, "stop": "3000"}, "x.json")
    with pytest.raises(parts.PartsError, match=r"x.json: .*bad id range"):
        parts.IndexPartMarker.from_json({**data, "start": 5000}, "x.json")
    trained = parts.read_trained(out, "image")
    assert trained is not None and trained.num_parts == 2 and trained.config["nlist"] == 32
    assert parts.TrainedMarker.from_json(trained.to_json(), "t.json") == trained
    with pytest.raises(parts.PartsError, match=r"t\.json: format"):
        parts.TrainedMarker.from_json({**trained.to_json(), "format": "x"}, "t.json")
    # a malformed part marker is not trusted: the part counts as incomplete (redone)
    path.write_text(json.dumps({**data, "sha256": 5}))
    assert parts.read_part(out, "image", 0, 2) is None


def test_cli_parts_and_merge(emb_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, ref = tmp_path / "idx", tmp_path / "ref"
    flags = ["--embeddings", str(emb_dir), "--kind", "ivf_sq8", "--modalities", "image", "--cpu"]
    assert main(["build", *flags, "--out", str(ref), "--num-shards", "2"]) == 0
    for i in (0, 1):
        assert main(["build", *flags, "--out", str(out), "--part", f"{i}/2"]) == 0
    assert "image: part 1/2, ids [3000, 6000) added" in capsys.readouterr().out
    assert main(["build", *flags, "--out", str(out), "--part", "1/2"]) == 0
    assert "complete already, kept" in capsys.readouterr().out
    assert main(["build", *flags, "--out", str(out), "--merge-parts"]) == 0
    for f in ("image.index", "image.ivfdata", "metadata.parquet"):
        assert (out / f).read_bytes() == (ref / f).read_bytes()

    # errors: one line, exit 2
    assert main(["build", *flags, "--out", str(tmp_path / "x"), "--merge-parts"]) == 2
    assert "part 0 has not trained the image quantizer" in capsys.readouterr().err
    argv = ["build", *flags, "--out", str(tmp_path / "y"), "--part", "1/2", "--wait-timeout", "0"]
    assert main(argv) == 2
    assert "waited 0 s for part 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["build", *flags, "--out", str(out), "--part", "2/2"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["build", *flags, "--out", str(out), "--part", "0/2", "--merge-parts"])
    assert main(["build", *flags, "--out", str(out), "--part", "0/2", "--num-shards", "3"]) == 2
    assert "--num-shards 3 contradicts --part 0/2" in capsys.readouterr().err


def test_parts_as_separate_processes(emb_dir: Path, tmp_path: Path) -> None:
    # What a SLURM array does: the parts are separate processes started at once, part 1 before
    # part 0 here, so it really waits for part 0's trained quantizer on the shared folder.
    out, ref = tmp_path / "idx", tmp_path / "ref"
    flags = ["--embeddings", str(emb_dir), "--out", str(out), "--kind", "ivf_sqfp16",
             "--modalities", "image", "--cpu"]  # fmt: skip
    cmd = [sys.executable, "-u", "-m", "clipforge.index", "build", *flags]
    waiting = subprocess.Popen(
        [*cmd, "--part", "1/2", "--wait-timeout", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert waiting.stdout is not None
    seen = []
    for line in waiting.stdout:  # part 0 starts only once part 1 says it is waiting for it
        seen.append(line)
        if "waiting for part 0's trained quantizer" in line:
            break
    assert "waiting" in seen[-1], seen
    trainer = subprocess.run([*cmd, "--part", "0/2"], capture_output=True, text=True, timeout=120)
    assert trainer.returncode == 0, trainer.stderr
    rest, _ = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, rest
    assert "ids [3000, 6000) added" in rest
    assert main(["build", *flags, "--merge-parts"]) == 0
    assert main(["build", *flags[:2], "--out", str(ref), *flags[4:], "--num-shards", "2"]) == 0
    for f in ("image.index", "image.ivfdata"):
        assert (out / f).read_bytes() == (ref / f).read_bytes()
