"""Describe and verify shards (``clipforge-data stats`` / ``clipforge-data verify``).

Both read every member of every shard through one scanner. ``stats`` reads image headers only;
``verify`` decodes every image fully and also checks the manifest (counts, sizes, sha256).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from clipforge.data_tools.images import ImageDecodeError, decode_image
from clipforge.data_tools.reader import parse_shard_spec
from clipforge.data_tools.shardformat import (
    IMAGE_MEMBER_EXTENSIONS,
    ManifestError,
    ShardReadError,
    iter_tar_members,
    read_manifest,
    sha256_file,
    split_member_name,
)
from clipforge.data_tools.stats import StatsAccumulator


@dataclass(frozen=True)
class Problem:
    """One defect found by ``verify``."""

    shard: str
    """The shard (or manifest) file."""
    where: str
    """The member or sample key ('' for the whole file)."""
    kind: str
    """Short code: truncated_shard, corrupt_image, missing_caption, key_collision, ..."""
    detail: str

    def __str__(self) -> str:
        loc = f"{self.shard}:{self.where}" if self.where else self.shard
        return f"{loc}: {self.kind}: {self.detail}"


@dataclass
class ShardScan:
    """What scanning one shard found."""

    url: str
    stats: StatsAccumulator = field(default_factory=StatsAccumulator)
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    bytes: int = 0


def scan_shard(url: str, full_decode: bool) -> ShardScan:
    """Read every member of a shard, grouping members into samples by key."""
    scan = ShardScan(url)
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    last_key: str | None = None
    try:
        for name, data in iter_tar_members(url):
            key, ext = split_member_name(name)
            scan.bytes += len(data)
            if key != last_key and key in samples:
                scan.problems.append(
                    Problem(url, name, "key_collision", f"key {key!r} appears twice in the shard")
                )
                continue
            if key not in samples:
                samples[key] = {}
                order.append(key)
            if ext in samples[key]:
                scan.problems.append(
                    Problem(url, name, "key_collision", f"member {name!r} appears twice")
                )
            samples[key][ext.lower()] = data
            last_key = key
    except ShardReadError as e:
        scan.problems.append(Problem(url, e.member, e.kind, e.detail))
    for key in order:
        _check_sample(scan, key, samples[key], full_decode)
    return scan


def _check_sample(scan: ShardScan, key: str, members: dict[str, bytes], full_decode: bool) -> None:
    ext = next((e for e in IMAGE_MEMBER_EXTENSIONS if e in members), None)
    if ext is None:
        scan.problems.append(
            Problem(scan.url, key, "missing_image", f"no image member among {sorted(members)}")
        )
        return
    if "txt" not in members:
        scan.problems.append(Problem(scan.url, key, "missing_caption", "no .txt member"))
        return
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        scan.problems.append(Problem(scan.url, key, "bad_caption", f"not UTF-8: {e}"))
        return
    if not caption.strip():
        scan.problems.append(Problem(scan.url, key, "bad_caption", "caption is empty"))
    if "json" in members:
        try:
            json.loads(members["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            scan.problems.append(Problem(scan.url, key, "bad_json", str(e)))
    try:
        # verify decodes fully; stats reads the header only (size and format)
        img = decode_image(members[ext]) if full_decode else Image.open(io.BytesIO(members[ext]))
    except (ImageDecodeError, OSError, ValueError) as e:
        scan.problems.append(Problem(scan.url, f"{key}.{ext}", "corrupt_image", str(e)))
        return
    scan.keys.append(key)
    scan.stats.add_sample(caption, img.size[0], img.size[1], ext, len(members[ext]))


def _scan_all(shards: str | Sequence[str], full_decode: bool, workers: int) -> list[ShardScan]:
    urls = [u for s in parse_shard_spec(shards) for u in s.urls]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decode releases the GIL
        return list(pool.map(lambda u: scan_shard(u, full_decode), urls))


def shard_stats(shards: str | Sequence[str], workers: int = 2) -> dict[str, Any]:
    """Counts, caption lengths, image sizes/formats overall and per shard."""
    scans = _scan_all(shards, full_decode=False, workers=workers)
    total = StatsAccumulator()
    per_shard = []
    for scan in scans:
        total.merge(scan.stats)
        per_shard.append(
            {
                "shard": scan.url,
                "samples": scan.stats.samples,
                "bytes": Path(scan.url).stat().st_size if Path(scan.url).exists() else scan.bytes,
                "caption_chars_mean": round(
                    sum(scan.stats.caption_chars) / max(scan.stats.samples, 1), 1
                ),
                "image_formats": dict(scan.stats.formats),
                "problems": len(scan.problems),
            }
        )
    summary = total.summary()
    summary.pop("failures")
    summary.pop("failed")
    summary.pop("failure_examples")
    return {
        "shards": len(scans),
        **summary,
        "problems": sum(len(s.problems) for s in scans),
        "per_shard": per_shard,
    }


def verify_shards(shards: str | Sequence[str], workers: int = 2) -> list[Problem]:
    """Every defect in the shards and their manifests (an empty list: all clean)."""
    scans = _scan_all(shards, full_decode=True, workers=workers)
    problems = [p for scan in scans for p in scan.problems]
    first_seen: dict[str, str] = {}
    for scan in scans:
        for key in scan.keys:
            if key in first_seen and first_seen[key] != scan.url:
                problems.append(
                    Problem(scan.url, key, "key_collision", f"key also in {first_seen[key]}")
                )
            first_seen.setdefault(key, scan.url)
    problems += _check_manifests(scans)
    return problems


def _check_manifests(scans: list[ShardScan]) -> list[Problem]:
    problems: list[Problem] = []
    by_folder: dict[Path, list[ShardScan]] = {}
    for scan in scans:
        if Path(scan.url).exists():
            by_folder.setdefault(Path(scan.url).parent, []).append(scan)
    for folder, folder_scans in sorted(by_folder.items()):
        manifest_path = folder / "manifest.json"
        try:
            manifest = read_manifest(folder)
        except ManifestError as e:
            problems.append(Problem(str(manifest_path), "", "bad_manifest", str(e)))
            continue
        if manifest is None:
            continue
        listed = {s.name: s for s in manifest.shards}
        for scan in folder_scans:
            name = Path(scan.url).name
            entry = listed.pop(name, None)
            if entry is None:
                problems.append(
                    Problem(
                        scan.url, "", "not_in_manifest", f"{manifest_path} does not list this shard"
                    )
                )
                continue
            size = Path(scan.url).stat().st_size
            if entry.samples != scan.stats.samples:
                problems.append(
                    Problem(
                        scan.url,
                        "",
                        "count_mismatch",
                        f"manifest says {entry.samples} samples, "
                        f"found {scan.stats.samples} good ones",
                    )
                )
            if entry.bytes != size:
                problems.append(
                    Problem(
                        scan.url,
                        "",
                        "size_mismatch",
                        f"manifest says {entry.bytes} bytes, file has {size}",
                    )
                )
            elif entry.sha256 != sha256_file(scan.url):
                problems.append(
                    Problem(
                        scan.url,
                        "",
                        "sha256_mismatch",
                        "file content differs from the manifest's sha256",
                    )
                )
        scanned_names = {Path(s.url).name for s in folder_scans}
        for name in sorted(set(listed) - scanned_names):
            if not (folder / name).exists():
                problems.append(
                    Problem(
                        str(folder / name),
                        "",
                        "missing_shard",
                        f"listed in {manifest_path} but absent",
                    )
                )
    return problems
