"""Seeded clustered synthetic embeddings written in the EMB_DIR layout (tests' shared helper).

Image vectors = L2-normalised (random unit centre + isotropic noise); each text vector is its
image vector plus further noise, re-normalised — so text rows are cross-modal queries that are
close to, but never equal to, the indexed image rows (and vice versa), like a trained CLIP.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(
    rng: np.random.Generator, n: int, centres: np.ndarray, noise: float
) -> np.ndarray:
    """(n, D) float32 unit vectors: a uniformly drawn centre + N(0, (noise/sqrt(D))^2) per dim."""
    dim = centres.shape[1]
    labels = rng.integers(0, len(centres), size=n)
    x = centres[labels] + rng.standard_normal((n, dim)) * (noise / np.sqrt(dim))
    return normalize(x).astype(np.float32)


def write_synthetic_embeddings(
    out_dir: str | Path,
    part_counts: Sequence[int] = (1500, 1000, 500),
    dim: int = 32,
    n_centres: int = 40,
    noise: float = 0.75,
    text_noise: float = 0.5,
    dtype: str = "float16",
    seed: int = 0,
    model_hash: str = "synthetic-model",
    modalities: Sequence[str] = ("image", "text"),
) -> Path:
    """Write ``embeddings.json``, ``img_emb``/``text_emb`` .npy parts and metadata parquet parts.

    Returns ``out_dir``. Deterministic for a given seed. ``part_counts`` may contain 0 (an empty
    part); an all-zero collection is written too (for the empty-collection error test).
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    centres = normalize(rng.standard_normal((n_centres, dim)))
    parts = []
    offset = 0
    for p, n in enumerate(part_counts):
        img = clustered_vectors(rng, n, centres, noise) if n else np.zeros((0, dim), np.float32)
        txt = (
            normalize(img + rng.standard_normal(img.shape) * (text_noise / np.sqrt(dim)))
            if n
            else img
        )
        arrays = {"image": ("img_emb", img), "text": ("text_emb", txt)}
        for m in modalities:
            folder, arr = arrays[m]
            (out / folder).mkdir(parents=True, exist_ok=True)
            np.save(out / folder / f"{folder}_{p}.npy", arr.astype(dtype))
        keys = [f"{offset + i:09d}" for i in range(n)]
        table = pa.table(
            {
                "key": pa.array(keys, pa.string()),
                "caption": pa.array([f"caption {k}" for k in keys], pa.string()),
                "shard": pa.array([f"train-{p:06d}.tar"] * n, pa.string()),
                "member": pa.array([f"{k}.jpg" for k in keys], pa.string()),
                "offset": pa.array(np.arange(n, dtype=np.int64) * 512, pa.int64()),
                "size": pa.array(np.full(n, 512, dtype=np.int64), pa.int64()),
                "source": pa.array([f"/src/{k}.jpg" for k in keys], pa.string()),
            }
        )
        (out / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out / "metadata" / f"metadata_{p}.parquet")
        parts.append({"part": p, "count": n})
        offset += n
    manifest = {
        "format": "clipforge-embeddings/1",
        "model_hash": model_hash,
        "model_source": "synthetic",
        "dim": dim,
        "dtype": dtype,
        "modalities": list(modalities),
        "count": offset,
        "parts": parts,
    }
    (out / "embeddings.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_all(emb_dir: str | Path, modality: str = "image") -> np.ndarray:
    """All vectors of a modality as one float32 array (tests only: small collections)."""
    d = Path(emb_dir)
    manifest = json.loads((d / "embeddings.json").read_text())
    folder = "img_emb" if modality == "image" else "text_emb"
    return np.concatenate(
        [
            np.load(d / folder / f"{folder}_{p['part']}.npy").astype(np.float32)
            for p in manifest["parts"]
        ]
    )
