"""Indexed items by row id or key: their metadata and stored image bytes (for ``/items``)."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .api_models import HitOut
from .emb_dir import read_member_bytes
from .http_guard import ApiError, shown
from .searcher import Hit
from .store import METADATA_NAME, contiguous

log = logging.getLogger(__name__)

IMAGE_MEDIA_TYPES = {
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "bmp": "image/bmp",
    "tif": "image/tiff",
    "tiff": "image/tiff",
}
"""Content type of a stored image by its tar member extension."""


_ASCII_DIGITS = re.compile(r"[0-9]+")


class ColumnView:
    """Row ``i`` of one metadata column, read from the Arrow array when asked for: no Python
    object per row is made up front (10M rows of five string columns as Python lists took
    ~3 GB; the Arrow table takes the 181 MB of its buffers). A missing column, or a null
    value, reads as ``default``."""

    def __init__(self, table: pa.Table, name: str, default: Any) -> None:
        self._default = default
        self._n = table.num_rows
        self._array: pa.Array | None = None
        if name in table.column_names and self._n:
            self._array = contiguous(table.select([name])).column(0).chunk(0)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Any:
        if not -self._n <= i < self._n:
            raise IndexError(f"row {i} of {self._n}")
        if self._array is None:
            return self._default
        value = self._array[i].as_py()
        return self._default if value is None else value

    def __iter__(self) -> Iterator[Any]:
        if self._array is None:
            yield from (self._default for _ in range(self._n))
            return
        for value in self._array.to_pylist():
            yield self._default if value is None else value


class ItemStore:
    """Row id / key -> metadata and stored image bytes, by random access into the shards.

    Holds the metadata columns as Arrow arrays (read on access, see :class:`ColumnView`); an
    image request is then one ``seek`` + ``read`` of the member's bytes at the offset recorded
    at embed time (no tar scan per request).
    """

    def __init__(self, index_dir: Path) -> None:
        cols = ["key", "caption", "source", "shard", "member", "offset", "size"]
        path = index_dir / METADATA_NAME
        present = set(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in cols if c in present], memory_map=True)
        self.count = table.num_rows
        self.keys = ColumnView(table, "key", "")
        self.captions = ColumnView(table, "caption", "")
        self.sources = ColumnView(table, "source", "")
        self.shards = ColumnView(table, "shard", "")
        self.members = ColumnView(table, "member", "")
        self.offsets = ColumnView(table, "offset", -1)
        self.sizes = ColumnView(table, "size", -1)
        self._by_key: dict[str, int] | None = None
        self._lock = threading.Lock()

    def resolve(self, ref: int | str) -> int:
        """Row id of ``ref``. An int is a row id. A string is a key when some item has that key
        (keys are often decimal, e.g. ``0000000133``), else a row id when decimal; ``key:K``
        and ``id:N`` say which explicitly."""
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise ApiError(422, f"item must be a row id or a key, got {shown(ref)}")
        if isinstance(ref, str):
            if ref.startswith("key:"):
                return self._by_key_or_404(ref[4:])
            if ref.startswith("id:"):
                ref = ref[3:]
                if not _ASCII_DIGITS.fullmatch(ref):
                    raise ApiError(422, f"id:{shown(ref)} is not a decimal row id")
            else:
                i = self._key_index().get(ref)
                if i is not None:
                    return i
                if not _ASCII_DIGITS.fullmatch(ref):
                    raise ApiError(404, f"no item with key {shown(ref)}")
            if len(ref.lstrip("0")) > 18:
                # int() of over 4,300 digits raises; any id this long is out of range anyway
                raise ApiError(
                    404,
                    f"no item with id {ref[:20]}… ({len(ref)} digits): ids are 0..{self.count - 1}",
                )
            ref = int(ref)
        if not 0 <= ref < self.count:
            raise ApiError(404, f"no item with id {shown(ref)}: ids are 0..{self.count - 1}")
        return ref

    def _key_index(self) -> dict[str, int]:
        with self._lock:  # built once, on the first key lookup, by whichever thread gets here
            if self._by_key is None:
                self._by_key = {str(k): i for i, k in enumerate(self.keys)}
            return self._by_key

    def _by_key_or_404(self, key: str) -> int:
        i = self._key_index().get(key)
        if i is None:
            raise ApiError(404, f"no item with key {shown(key)}")
        return i

    def has_image(self, i: int) -> bool:
        return self.offsets[i] >= 0 and self.sizes[i] >= 0 and bool(self.shards[i])

    def image(self, i: int) -> tuple[bytes, str]:
        """``(bytes, media type)`` of item ``i``'s stored image."""
        if not self.has_image(i):
            raise ApiError(
                404,
                f"item {i} ({self.keys[i]!r}) has no stored image offset (its shard was remote "
                "or compressed when embedded)",
            )
        try:
            data = read_member_bytes(self.shards[i], int(self.offsets[i]), int(self.sizes[i]))
        except (OSError, ValueError) as e:
            log.warning("item %d: %s", i, e)
            raise ApiError(404, f"the image of item {i} ({self.keys[i]!r}) is unavailable") from e
        ext = self.members[i].rsplit(".", 1)[-1].lower() if "." in self.members[i] else ""
        return data, IMAGE_MEDIA_TYPES.get(ext, "application/octet-stream")

    def hit_out(self, hit: Hit) -> HitOut:
        return HitOut(
            id=hit.id,
            # Stored float16 vectors are unit length only to ~1e-4, so an item scored against
            # itself can come out as 1.000036: a cosine similarity is within [-1, 1].
            score=round(min(1.0, max(-1.0, hit.score)), 6),
            key=hit.key,
            caption=hit.caption,
            source=hit.source,
            image_url=f"/items/{hit.id}/image",
        )
