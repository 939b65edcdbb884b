"""Search an index directory by text, by image, or by raw embedding.

::

    from clipforge.index.searcher import Searcher
    s = Searcher.open("demo-index")                 # the index's own copy of its model
    hits = s.search_text("a red heart", k=10)        # text -> image
    hits = s.search_image("query.png", k=10)         # image -> image
    hits = s.search_image("query.png", target="text")  # image -> caption
    batch = s.search_text(["cat", "dog"], k=5)       # batched: one hit list per query

The query model must be the one whose embeddings the index holds: :meth:`Searcher.open` compares
its weights hash with ``index.json``'s ``model_hash`` and refuses any other model
(:class:`ModelMismatchError`), because another model's vectors live in a different space and
would return confident nonsense. By default it loads the index's own copy of that model
(``INDEX_DIR/model/``, recorded by embed and build), so an index stays searchable after its run
is trained further (``RUN/model/`` re-exported) or its checkpoint pruned.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, overload

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipforge.data_tools.images import to_rgb
from clipforge.pretrain.models import LoadedModel, dual_encoder, load_model

from .store import (
    MODALITIES,
    MODEL_DIR,
    IndexIntegrityError,
    ModalityIndexEntry,
    OpenIndex,
    modality_entry,
    open_index,
    read_index_manifest,
)

ImageQuery = str | os.PathLike[str] | Image.Image
"""An image query: a file path or a PIL image."""


class SearchError(ValueError):
    """A query that cannot be answered (bad k, wrong dimension, empty collection, ...)."""


class ModelMismatchError(SearchError):
    """The query model is not the model the index was built with."""


@dataclass(frozen=True)
class Hit:
    """One search result."""

    id: int
    """Row id in the index (= row of ``metadata.parquet``)."""
    score: float
    """Cosine similarity to the query (inner product of unit vectors; higher is closer)."""
    key: str
    """Sample key in its shard."""
    caption: str
    """The sample's caption."""
    source: str
    """The sample's original source path ("" if unknown)."""
    shard: str
    """The shard holding the sample."""
    member: str = ""
    """Image member name in the shard tar ("" if unknown)."""
    offset: int = -1
    """Byte offset of the image data in a local uncompressed shard (-1 if unknown)."""
    size: int = -1
    """Byte length of the image data (-1 if unknown)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_k(k: int, count: int, where: str) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise SearchError(f"k must be an integer, got {k!r}")
    if count == 0:
        raise SearchError(f"{where} is empty (count 0): there is nothing to search")
    if k < 1:
        raise SearchError(f"k must be >= 1, got {k}")
    if k > count:
        raise SearchError(f"k={k} exceeds the collection size: {where} holds {count} items")


class Searcher:
    """Queries against one index directory (open with :meth:`open`)."""

    def __init__(
        self,
        index_dir: Path,
        manifest: dict[str, Any],
        model: LoadedModel | None,
        model_spec: str | None,
        device: str,
        mmap: bool,
    ) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self._model = model
        self._model_spec = model_spec
        self._device = device
        self._mmap = mmap
        self._indexes: dict[str, OpenIndex] = {}
        self._text_encoder: Callable[[Sequence[str]], np.ndarray] | None = None
        self.query_encoder = "torch"
        """What encodes text queries: ``torch``, ``onnx`` or ``onnx-int8``."""

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike[str],
        model: str | os.PathLike[str] | LoadedModel | None = None,
        device: str = "cpu",
        mmap: bool = False,
    ) -> Searcher:
        """Open ``index_dir`` (its ``index.json`` is read and its image index loaded now).

        ``model``: a run dir / checkpoint path or a :class:`LoadedModel`; checked now against
        the index's ``model_hash``. None: the index's own copy of its model (``INDEX_DIR/model/``;
        for indexes built before it was kept, ``index.json``'s ``model_source``), loaded (and
        checked) at the first text or image query, so raw-embedding search needs no model file.
        ``mmap``: memory-map the index data instead of reading it into RAM.
        """
        d = Path(index_dir)
        manifest = read_index_manifest(d)
        loaded: LoadedModel | None = None
        spec: str | None = None
        if isinstance(model, LoadedModel):
            loaded = model
        elif model is not None:
            spec = os.fspath(model)
            loaded = load_model(spec, device)
        searcher = cls(d, manifest, loaded, spec, device, mmap)
        if loaded is not None:
            searcher._check_model(loaded, spec or loaded.source)
        first = "image" if "image" in manifest["modalities"] else next(iter(manifest["modalities"]))
        searcher._index(first)  # fail now, not at the first query, on a damaged index
        return searcher

    def _check_model(self, loaded: LoadedModel, name: str) -> None:
        expected = self.manifest.get("model_hash")
        if not expected:
            raise ModelMismatchError(
                f"{self.index_dir / 'index.json'} records no model_hash: cannot check that "
                f"{name} is the model the index was built with"
            )
        if loaded.model_hash != expected:
            own = self._own_model_dir()
            use = (
                f"leave the model out to use the index's own copy ({own})"
                if own is not None
                else "use that model"
            )
            raise ModelMismatchError(
                f"model {name} (weights hash {loaded.model_hash}) is not the model the index "
                f"{self.index_dir} was built with (hash {expected}, from "
                f"{self.manifest.get('model_source')}); {use}, or re-embed and rebuild with "
                "this one"
            )

    def _own_model_dir(self) -> Path | None:
        """``INDEX_DIR/model/`` when index.json records the index's copy of its model."""
        rec = self.manifest.get("model")
        return self.index_dir / str(rec.get("dir", MODEL_DIR)) if isinstance(rec, dict) else None

    @property
    def has_query_model(self) -> bool:
        """Whether text and image queries can be encoded: a model was given, or the index has
        its own copy, or its ``model_source`` exists here. An index built from embeddings
        computed elsewhere may have none: it answers embedding (vector) queries only."""
        if self._model is not None or self._model_spec is not None:
            return True
        if self._own_model_dir() is not None:
            return True
        source = self.manifest.get("model_source")
        return bool(source) and Path(str(source)).exists()

    @property
    def model(self) -> LoadedModel:
        """The query model (the index's own copy, else ``model_source``; loaded on first use)."""
        if self._model is None:
            own = self._own_model_dir()
            if self._model_spec is None and own is not None:
                for rel, f in self.manifest["model"].get("files", {}).items():
                    path = self.index_dir / rel
                    if not path.is_file() or path.stat().st_size != f.get("size_bytes"):
                        raise IndexIntegrityError(
                            f"{path} (the index's copy of its query model) is missing or "
                            "resized: pass the model explicitly (--model)"
                        )
                loaded = load_model(own, self._device)
                self._check_model(loaded, str(own))
                self._model = loaded
                return loaded
            spec = self._model_spec or self.manifest.get("model_source")
            if not spec:
                raise SearchError(
                    f"{self.index_dir / 'index.json'} names no model_source: pass model=..."
                )
            if not Path(spec).exists():
                raise SearchError(
                    f"the index's model {spec} (model_source in {self.index_dir / 'index.json'}) "
                    "does not exist here: pass the model explicitly (--model)"
                )
            loaded = load_model(spec, self._device)
            self._check_model(loaded, spec)
            self._model = loaded
        return self._model

    def _index(self, target: str) -> OpenIndex:
        if target not in MODALITIES:
            raise SearchError(f"target must be one of {MODALITIES}, got {target!r}")
        if target not in self._indexes:
            if target not in self.manifest["modalities"]:
                raise SearchError(
                    f"{self.index_dir} has no {target} index (it indexes "
                    f"{sorted(self.manifest['modalities'])})"
                )
            self._indexes[target] = open_index(self.index_dir, target, mmap=self._mmap)
        return self._indexes[target]

    def faiss_index(self, target: str = "image") -> faiss.Index:
        """The opened FAISS index of ``target`` with its tuned search parameters applied (for
        callers that time or inspect the index itself, e.g. the scale benchmark)."""
        return self._index(target).index

    # ------------------------------------------------------------------ properties

    @property
    def count(self) -> int:
        """Items in the collection."""
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest["dim"])

    @property
    def model_hash(self) -> str | None:
        """Weights hash of the model the index was built with."""
        return self.manifest.get("model_hash")

    @property
    def targets(self) -> list[str]:
        """Searchable targets: ``image`` and/or ``text``."""
        return [m for m in MODALITIES if m in self.manifest["modalities"]]

    @property
    def entries(self) -> dict[str, ModalityIndexEntry]:
        """index.json's typed entry of each target (kind, factory, tuned parameters, ...)."""
        return {m: modality_entry(self.manifest, m) for m in self.targets}

    # ------------------------------------------------------------------ embedding queries

    def use_onnx_text_encoder(
        self, export_dir: str | os.PathLike[str], int8: bool = False, threads: int | None = None
    ) -> None:
        """Encode text queries with an exported ONNX text graph (``clipforge-export onnx``)
        instead of PyTorch. The export must be of the index's model (its weights hash is
        checked); image queries still run on the PyTorch model."""
        from .onnx_encoder import OnnxQueryEncoder

        if not self.model_hash:
            raise ModelMismatchError(
                f"{self.index_dir / 'index.json'} records no model_hash: cannot check that "
                f"{export_dir} exports the model the index was built with"
            )
        encoder = OnnxQueryEncoder.open(
            export_dir, int8_text=int8, threads=threads, expect_model_hash=self.model_hash
        )
        self._text_encoder = encoder.encode_text
        self.query_encoder = "onnx-int8" if int8 else "onnx"

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """(Q, D) float32 unit vectors of ``texts``."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise SearchError("no text query given")
        if self._text_encoder is not None:
            return self._text_encoder(list(texts))  # (Q, D) unit rows
        m = self.model
        device = next(m.model.parameters()).device
        with torch.inference_mode():
            tokens = m.tokenizer(list(texts)).to(device)  # (Q, context_length)
            feats = dual_encoder(m.model).encode_text(tokens)  # (Q, D)
            return F.normalize(feats.float(), dim=-1).cpu().numpy()  # (Q, D) unit rows

    def embed_images(self, images: Sequence[ImageQuery]) -> np.ndarray:
        """(Q, D) float32 unit vectors of image files or PIL images."""
        if not images:
            raise SearchError("no image query given")
        m = self.model
        device = next(m.model.parameters()).device
        per_sample, per_batch = m.image_transforms()
        tensors = [per_sample(to_rgb(_open_image(img))) for img in images]  # (3, H, W) uint8
        with torch.inference_mode():
            batch = per_batch(torch.stack(tensors).to(device))  # (Q, 3, H, W) normalised
            feats = dual_encoder(m.model).encode_image(batch)  # (Q, D)
            return F.normalize(feats.float(), dim=-1).cpu().numpy()  # (Q, D) unit rows

    # ------------------------------------------------------------------ searching

    def search_embeddings(
        self, queries: np.ndarray, k: int = 10, target: str = "image"
    ) -> list[list[Hit]]:
        """Nearest ``k`` items of ``target`` for each row of ``queries`` ((Q, D) or (D,))."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise SearchError(f"query embeddings must be (Q, D) or (D,), got shape {q.shape}")
        if q.shape[1] != self.dim:
            raise SearchError(
                f"query dimension {q.shape[1]} does not match the index dimension {self.dim} "
                f"({self.index_dir})"
            )
        if len(q) == 0:
            raise SearchError("no query embeddings given (0 rows)")
        if not np.issubdtype(q.dtype, np.floating) or not np.isfinite(q).all():
            raise SearchError("query embeddings must be finite floating-point values")
        opened = self._index(target)
        _check_k(k, self.count, str(self.index_dir))
        q = np.ascontiguousarray(q, dtype=np.float32)
        # Unit queries: scores are cosine similarities whatever the caller's scaling was.
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        scores, ids = opened.index.search(q, int(k))  # (Q, k) each; id -1 = no result
        if self.manifest.get("metric") == "inner_product":
            # Unit queries against unit vectors (build renormalises every indexed row): a
            # cosine, in [-1, 1]. Float32 rounding, and the reconstruction error of lossy codes
            # (SQ8, PQ), can still put a near-duplicate a hair past 1: clamp, keeping the order.
            np.clip(scores, -1.0, 1.0, out=scores)
        return self._hits(opened, scores, ids)

    # A str is also a Sequence[str]: the first overload wins for it, which is the intent.
    @overload
    def search_text(  # type: ignore[overload-overlap]
        self, texts: str, k: int = 10, target: str = "image"
    ) -> list[Hit]: ...
    @overload
    def search_text(
        self, texts: Sequence[str], k: int = 10, target: str = "image"
    ) -> list[list[Hit]]: ...
    def search_text(
        self, texts: str | Sequence[str], k: int = 10, target: str = "image"
    ) -> list[Hit] | list[list[Hit]]:
        """Text -> image (or -> caption with ``target="text"``). One string: one hit list;
        a list of strings: one hit list per string, embedded and searched as one batch."""
        _check_k(k, self.count, str(self.index_dir))
        if isinstance(texts, str):
            return self.search_embeddings(self.embed_text([texts]), k, target)[0]
        return self.search_embeddings(self.embed_text(texts), k, target)

    # A str path is also a Sequence: as for search_text, the single-query overload wins.
    @overload
    def search_image(  # type: ignore[overload-overlap]
        self, images: ImageQuery, k: int = 10, target: str = "image"
    ) -> list[Hit]: ...
    @overload
    def search_image(
        self, images: Sequence[ImageQuery], k: int = 10, target: str = "image"
    ) -> list[list[Hit]]: ...
    def search_image(
        self, images: ImageQuery | Sequence[ImageQuery], k: int = 10, target: str = "image"
    ) -> list[Hit] | list[list[Hit]]:
        """Image -> image (or image -> caption with ``target="text"``); batched like
        :meth:`search_text`."""
        _check_k(k, self.count, str(self.index_dir))
        if isinstance(images, (str, os.PathLike, Image.Image)):
            return self.search_embeddings(self.embed_images([images]), k, target)[0]
        return self.search_embeddings(self.embed_images(list(images)), k, target)

    def _hits(self, opened: OpenIndex, scores: np.ndarray, ids: np.ndarray) -> list[list[Hit]]:
        valid = ids[ids >= 0]
        rows: dict[int, dict[str, Any]] = {}
        if len(valid):
            uniq = np.unique(valid)
            table = opened.metadata.take(uniq)
            rows = dict(zip(uniq.tolist(), table.to_pylist(), strict=True))
        out: list[list[Hit]] = []
        for q_scores, q_ids in zip(scores, ids, strict=True):
            hits = []
            for score, i in zip(q_scores.tolist(), q_ids.tolist(), strict=True):
                if i < 0:
                    continue  # an approximate index found fewer than k neighbours
                r = rows[i]
                hits.append(
                    Hit(
                        id=int(i),
                        score=float(score),
                        key=str(r.get("key", "")),
                        caption=str(r.get("caption", "")),
                        source=str(r.get("source") or ""),
                        shard=str(r.get("shard", "")),
                        member=str(r.get("member") or ""),
                        offset=int(r["offset"]) if r.get("offset") is not None else -1,
                        size=int(r["size"]) if r.get("size") is not None else -1,
                    )
                )
            out.append(hits)
        return out


def _open_image(img: ImageQuery) -> Image.Image:
    if isinstance(img, Image.Image):
        return img
    path = Path(img)
    if not path.is_file():
        raise SearchError(f"image query {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im
    except (OSError, Image.DecompressionBombError) as e:
        raise SearchError(f"image query {path} is not a readable image ({e})") from None
