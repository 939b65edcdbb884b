"""``clipforge-data verify`` and ``stats`` on real shards, clean and damaged one way at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clipforge.data_tools.cli import main
from clipforge.data_tools.writer import WriteConfig, write_shards

from .shard_helpers import Members, make_folder_source, rewrite_tar, tar_members

# 8 samples in 2 shards; sample keys 0000000000..0000000003 and 0000010000..0000010003
SHARD0, SHARD1 = "shard-000000.tar", "shard-000001.tar"


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    make_folder_source(root / "src", 8, size=(20, 14))
    config = WriteConfig(image_size=12, shard_size=4, image_format="png")
    write_shards(root / "src", root / "shards", config, progress=False)
    return root / "shards"


@pytest.fixture
def shards(clean_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the clean shards, to damage."""
    return Path(shutil.copytree(clean_shards, tmp_path / "shards"))


def _verify(shards: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main(["verify", str(shards)])
    return code, capsys.readouterr().out.splitlines()


def _problem(shards: Path, shard: str, where: str, kind: str) -> str:
    return f"{shards / shard}:{where}: {kind}: " if where else f"{shards / shard}: {kind}: "


def _has(lines: list[str], prefix: str) -> bool:
    return any(line.startswith(prefix) for line in lines)


def test_verify_passes_clean_shards(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = _verify(shards, capsys)
    assert (code, lines) == (0, ["verify: all shards clean"])


def test_verify_catches_a_shard_truncated_inside_a_member_and_names_it(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (shards / SHARD1).read_bytes()
    # cut 100 bytes into the data of the third sample's image (each member: 512 B header + data)
    offset = 0
    for name, member in tar_members(shards / SHARD1):
        if name == "0000010002.png":
            break
        offset += 512 + -(-len(member) // 512) * 512
    (shards / SHARD1).write_bytes(data[: offset + 512 + 100])

    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD1, "0000010002.png", "truncated_shard"))
    assert not any(SHARD0 in line for line in lines)  # the intact shard is not blamed


def test_verify_catches_a_shard_cut_at_a_member_boundary(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = (shards / SHARD0).read_bytes()
    # drop the end-of-archive blocks and the last sample: stream readers would see no error
    first_three = sum(512 + -(-len(d) // 512) * 512 for _, d in tar_members(shards / SHARD0)[:9])
    (shards / SHARD0).write_bytes(data[:first_three])

    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD0, "after 0000000002.json", "truncated_shard"))


def test_verify_catches_an_undecodable_image_and_names_the_member(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def damage(members: Members) -> Members:
        # a PNG signature followed by garbage: opens as PNG, fails to decode
        bad = b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20
        return [(n, bad if n == "0000000001.png" else d) for n, d in members]

    rewrite_tar(shards / SHARD0, damage)
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD0, "0000000001.png", "corrupt_image"))
    # one fewer good sample than the manifest promises
    assert _has(lines, _problem(shards, SHARD0, "", "count_mismatch") + "manifest says 4 samples")
    assert not any(SHARD1 in line for line in lines)


def test_verify_catches_a_missing_caption(shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_tar(shards / SHARD1, lambda ms: [(n, d) for n, d in ms if n != "0000010003.txt"])
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD1, "0000010003", "missing_caption"))


def test_verify_catches_a_key_used_twice_in_a_shard(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the first sample appended again at the end: two samples with one key
    rewrite_tar(shards / SHARD0, lambda ms: ms + ms[:3])
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD0, "0000000000.png", "key_collision"))


def test_verify_catches_a_key_used_in_two_shards(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a copy of shard 0 under another name (e.g. a botched manual merge)
    shutil.copy(shards / SHARD0, shards / "shard-000009.tar")
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, "shard-000009.tar", "0000000000", "key_collision"))
    assert _has(lines, _problem(shards, "shard-000009.tar", "", "not_in_manifest"))


def test_verify_catches_a_manifest_count_that_does_not_match(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = 5
    (shards / "manifest.json").write_text(json.dumps(manifest))
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert lines[0] == (
        _problem(shards, SHARD1, "", "count_mismatch")
        + "manifest says 5 samples, found 4 good ones"
    )


def test_verify_catches_same_size_content_change_by_sha256(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # flip one character of a caption in place: the tar stays valid and the same size
    data = bytearray((shards / SHARD1).read_bytes())
    at = data.index(b"picture number 5")
    data[at] = ord("P")
    (shards / SHARD1).write_bytes(bytes(data))
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert lines[0] == (
        _problem(shards, SHARD1, "", "sha256_mismatch")
        + "file content differs from the manifest's sha256"
    )
    assert len(lines) == 1  # nothing else is wrong with it


def test_verify_catches_a_shard_listed_in_the_manifest_but_gone(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (shards / SHARD1).unlink()
    code, lines = _verify(shards, capsys)
    assert code == 1
    assert _has(lines, _problem(shards, SHARD1, "", "missing_shard"))


def test_stats_prints_per_shard_counts_and_totals(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["stats", str(shards)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if ".tar" in line]
    assert [(Path(r[0]).name, r[1]) for r in rows] == [(SHARD0, "4"), (SHARD1, "4")]
    assert "8 samples in 2 shards" in out
    # stats describes the stored images: 12x12 png
    assert "image size: width 12..12 (p50 12.0), height 12..12 (p50 12.0)" in out
    assert "problems found" not in out


def test_stats_json_parses_and_counts_problems(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite_tar(shards / SHARD1, lambda ms: [(n, d) for n, d in ms if n != "0000010003.txt"])
    capsys.readouterr()
    assert main(["stats", str(shards), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["shards"], st["samples"], st["problems"]) == (2, 7, 1)
    assert [s["samples"] for s in st["per_shard"]] == [4, 3]
    assert st["image_formats"] == {"png": 7}
    assert st["image_width"]["min"] == st["image_width"]["max"] == 12
    captions = [f"picture number {i}" for i in range(7)]
    assert st["caption_chars"]["max"] == max(len(c) for c in captions)
