"""The on-disk shard format shared by writer, reader, stats and verify.

A shard is a webdataset tar: each sample is ``KEY.<image ext>``, ``KEY.txt`` (UTF-8 caption) and
``KEY.json`` (metadata), members of a sample adjacent. This is also what img2dataset writes.
Beside the shards, ``manifest.json`` lists every shard with its sample count, size and sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
STATS_NAME = "stats.json"
MANIFEST_FORMAT = "clipforge.shards/v1"
IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Fixed member metadata so the same input always gives byte-identical shards.
_MEMBER_MTIME = 1_700_000_000


class ManifestError(ValueError):
    """A manifest file is missing, malformed or inconsistent (the message names the file)."""


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.jpg`` -> (``dir/abc``, ``seg.jpg``): webdataset's key/extension split.

    The key is everything up to the first dot of the base name, so multi-dot extensions stay whole.
    """
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one regular file member with deterministic metadata."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _MEMBER_MTIME
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard as listed in ``manifest.json``."""

    name: str
    """File name relative to the manifest's folder."""
    samples: int
    """Number of complete samples in the shard."""
    bytes: int
    """File size in bytes."""
    sha256: str
    """Hex sha256 of the whole file."""


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``: the shards of a dataset folder, so readers need no scan for counts."""

    shards: tuple[ShardEntry, ...]
    """Every shard, in name order."""
    writer: dict[str, Any]
    """The writer settings that produced the shards (image size, format, ...)."""

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "samples": self.samples,
            "shards": [vars(s) for s in self.shards],
            "writer": self.writer,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"{where}: not a clipforge manifest (format {MANIFEST_FORMAT!r})")
        try:
            shards = tuple(
                ShardEntry(str(s["name"]), int(s["samples"]), int(s["bytes"]), str(s["sha256"]))
                for s in obj["shards"]
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(
                f"{where}: malformed shard entry ({type(e).__name__}: {e})"
            ) from None
        return cls(shards, dict(obj.get("writer", {})))


def read_manifest(folder: str | os.PathLike[str], name: str = MANIFEST_NAME) -> Manifest | None:
    """The manifest in ``folder``, or None when the folder has none."""
    path = Path(folder) / name
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: unreadable ({e})") from None
    return Manifest.from_json(obj, str(path))
