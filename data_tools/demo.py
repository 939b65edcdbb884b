"""The embedded emoji demo dataset: gzip-compressed shards shipped inside the package."""

from __future__ import annotations

import gzip
import os
import shutil
from importlib import resources
from pathlib import Path

from clipforge.data_tools.atomic import atomic_output
from clipforge.data_tools.shardformat import (
    MANIFEST_NAME,
    STATS_NAME,
    Manifest,
    ManifestError,
    read_manifest,
    sha256_file,
)


def demo_data_dir() -> Path:
    """The folder inside the installed package that holds the compressed demo shards."""
    return Path(str(resources.files("clipforge.data_tools") / "demo_data"))


def write_demo_shards(out_dir: str | os.PathLike[str]) -> Manifest:
    """Write the demo shards, manifest, stats and license NOTICE into ``out_dir``.

    Shards already present with the right sha256 are kept, so re-running is cheap; every shard
    written is checked against the shipped manifest.
    """
    src = demo_data_dir()
    manifest = read_manifest(src)
    if manifest is None:
        raise ManifestError(f"{src}: the package's demo dataset is missing its manifest")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for shard in manifest.shards:
        final = out / shard.name
        if (
            final.exists()
            and final.stat().st_size == shard.bytes
            and sha256_file(final) == shard.sha256
        ):
            continue
        with (
            atomic_output(final) as tmp,
            gzip.open(src / f"{shard.name}.gz", "rb") as gz,
            open(tmp, "wb") as f,
        ):
            shutil.copyfileobj(gz, f)
            f.flush()
            if sha256_file(tmp) != shard.sha256:
                raise ManifestError(
                    f"{src / (shard.name + '.gz')}: content does not match the "
                    f"manifest (damaged installation?)"
                )
    for name in (MANIFEST_NAME, STATS_NAME, "NOTICE"):
        shutil.copy(src / name, out / name)
    return manifest
