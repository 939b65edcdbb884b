"""``iter_tar_entries``: the plain-tar parser gives exactly what ``tarfile`` gives (names, bytes,
data offsets), hands pax / GNU long-name members to ``tarfile``, and reports damage as the
reader's shard errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from clipforge.data_tools.shardformat import ShardReadError, iter_tar_entries


def _tar(path: Path, fmt: int, members: list[tuple[str, bytes | None]]) -> Path:
    """A tar in ``fmt`` with ``members`` (data None: a directory)."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _reference(path: Path) -> list[tuple[str, bytes, int]]:
    with tarfile.open(path) as tar:
        return [
            (m.name, tar.extractfile(m).read(), m.offset_data)  # type: ignore[union-attr]
            for m in tar
            if m.isfile()
        ]


MEMBERS: list[tuple[str, bytes | None]] = [
    ("000001.txt", b"a cat"),
    ("000001.json", b'{"name": "cat"}'),
    ("dir", None),
    ("000002.txt", b""),  # empty member
    ("000002.bin", bytes(range(256)) * 2),  # exactly one block
    ("000003.bin", bytes(range(256)) * 5 + b"x"),  # several blocks and a tail
    # ustar's prefix field: a name over 100 bytes with a slash
    ("p" * 90 + "/" + "q" * 60 + ".txt", b"prefixed"),
]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_plain_members_match_tarfile(tmp_path: Path, fmt: int) -> None:
    path = _tar(tmp_path / "a.tar", fmt, MEMBERS)
    got = list(iter_tar_entries(str(path)))
    assert got == _reference(path)
    assert [name for name, _, _ in got][-1] == "p" * 90 + "/" + "q" * 60 + ".txt"
    raw = path.read_bytes()
    assert all(raw[off : off + len(data)] == data for _, data, off in got)  # offsets are the file's


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_hand_the_rest_to_tarfile(tmp_path: Path, fmt: int) -> None:
    # a 150-byte name without a slash needs GNU's ././@LongLink or a pax header; non-ASCII
    # names need pax: the parser stops there and tarfile reads on, offsets still the file's
    members: list[tuple[str, bytes | None]] = [
        ("000001.txt", b"before"),
        ("n" * 150 + ".txt", b"long"),
        ("000002.txt", b"after"),
    ]
    if fmt == tarfile.PAX_FORMAT:
        members.append(("caf\u00e9.txt", b"accent"))
    path = _tar(tmp_path / "long.tar", fmt, members)
    got = list(iter_tar_entries(str(path)))
    assert got == _reference(path)
    assert [d for _, d, _ in got] == [d for _, d in members]


def test_damage_is_reported_as_shard_errors(tmp_path: Path) -> None:
    path = _tar(tmp_path / "a.tar", tarfile.USTAR_FORMAT, MEMBERS)
    raw = path.read_bytes()

    bad_sum = bytearray(raw)
    bad_sum[1024 + 10] ^= 0xFF  # the second header's name: its checksum no longer matches
    (tmp_path / "sum.tar").write_bytes(bytes(bad_sum))
    with pytest.raises(ShardReadError) as e:
        list(iter_tar_entries(str(tmp_path / "sum.tar")))
    assert e.value.kind == "truncated_shard" and "bad checksum" in e.value.detail
    assert e.value.member == "after 000001.txt"

    (tmp_path / "cut.tar").write_bytes(raw[: 1024 + 512 + 5])  # inside the second member
    with pytest.raises(ShardReadError) as e:
        list(iter_tar_entries(str(tmp_path / "cut.tar")))
    assert e.value.kind == "truncated_shard" and e.value.member == "000001.json"

    (tmp_path / "noend.tar").write_bytes(raw[:1024])  # ends after the first member
    with pytest.raises(ShardReadError) as e:
        list(iter_tar_entries(str(tmp_path / "noend.tar")))
    assert e.value.kind == "truncated_shard" and "end-of-archive" in e.value.detail

    for name, data in (("junk.tar", b"not a tar at all" * 64), ("empty.tar", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardReadError) as e:
            list(iter_tar_entries(str(tmp_path / name)))
        assert e.value.kind == "unreadable_shard", name
