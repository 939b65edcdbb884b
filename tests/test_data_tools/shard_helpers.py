"""Helpers shared by the data_tools tests: small real images, and reading shards back."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from clipforge.data_tools.shardformat import add_member, split_member_name

Members = list[tuple[str, bytes]]


def pattern_image(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB image whose every pixel differs from its neighbours and from other seeds' images,
    so a crop, flip, swap or lossy step shows up in a pixel comparison."""
    w, h = size
    data = bytes(
        channel
        for y in range(h)
        for x in range(w)
        for channel in ((x * 7 + seed * 31) % 256, (y * 11 + seed * 17) % 256, (x * y + seed) % 256)
    )
    return Image.frombytes("RGB", size, data)


def image_bytes(img: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save_args)
    return buf.getvalue()


def make_folder_source(root: Path, count: int, size: tuple[int, int] = (24, 18)) -> list[str]:
    """``count`` PNG images with same-stem captions under ``root``; returns the captions."""
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for i in range(count):
        pattern_image(size, i).save(root / f"img{i:03d}.png")
        caption = f"picture number {i}"
        (root / f"img{i:03d}.txt").write_text(caption + "\n", encoding="utf-8")
        captions.append(caption)
    return captions


def tar_members(path: Path) -> Members:
    """Every (name, data) of a tar, in archive order (via the standard library, not our reader)."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]  # type: ignore[union-attr]


def shard_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """The samples of one shard: key -> {extension: data}."""
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in tar_members(path):
        key, ext = split_member_name(name)
        samples.setdefault(key, {})[ext] = data
    return samples


def all_samples(out_dir: Path) -> dict[str, dict[str, bytes]]:
    """The samples of every ``*.tar`` in ``out_dir``; fails on a key found in two shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob("*.tar")):
        for key, members in shard_samples(shard).items():
            assert key not in samples, f"key {key} in two shards"
            samples[key] = members
    return samples


def rewrite_tar(path: Path, change: Callable[[Members], Members]) -> None:
    """Rewrite a shard with its member list passed through ``change`` (to damage it)."""
    members = change(tar_members(path))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_member(tar, name, data)
