"""Sharded IVF builds merged into on-disk inverted lists, for indexes larger than one machine's RAM.

Scheme (the one FAISS documents for billion-scale indexes):

1. train one IVF index on a sample (:func:`clipforge.index.faiss_ops.train_index`) and save it empty
   (:func:`save_trained`) — every shard shares its quantizer, so their lists are compatible;
2. each shard (a contiguous range of global ids: one per rank / SLURM task, or one after the other
   in a single process) loads the trained index, adds its rows, and writes a shard index
   (:func:`build_shard`); only that shard's lists are ever in RAM;
3. :func:`merge_on_disk` concatenates the shards' lists, list by list, into one ``.ivfdata`` file
   (FAISS ``OnDiskInvertedLists``), reading the shard files memory-mapped; the merged ``.index``
   holds the quantizer and a reference to the ``.ivfdata``;
4. searching memory-maps the ``.ivfdata`` (``store.open_index`` loads it with
   ``IO_FLAG_ONDISK_SAME_DIR``, so the pair can be moved together).

Shards are contiguous id ranges added in order, so each merged list holds its ids in ascending
order, exactly as a single in-RAM build would: the merged index returns identical results.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import faiss

from clipforge.data_tools.atomic import OutOfSpaceError, atomic_output, out_of_space

from . import store
from .emb_dir import VectorSource
from .faiss_ops import GpuResources, Log, add_vectors


def shard_ranges(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Split ids ``[0, count)`` into ``num_shards`` contiguous near-equal ``(start, stop)``."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    bounds = [count * s // num_shards for s in range(num_shards + 1)]
    return [(bounds[s], bounds[s + 1]) for s in range(num_shards)]


def save_trained(index: faiss.Index, path: str | os.PathLike[str]) -> None:
    """Save a trained, empty IVF index for the shards to start from."""
    if faiss.try_extract_index_ivf(index) is None:
        raise ValueError(f"sharded builds need an IVF index, got {type(index).__name__}")
    if index.ntotal != 0 or not index.is_trained:
        raise ValueError("save_trained expects a trained index with no vectors")
    store.write_faiss_index(index, path)


def build_shard(
    trained_path: str | os.PathLike[str],
    source: VectorSource,
    shard: int,
    num_shards: int,
    out_path: str | os.PathLike[str],
    chunk_size: int = 65_536,
    gpu: GpuResources | None = None,
) -> Path:
    """Add shard ``shard`` of ``num_shards`` (global ids kept) to the trained index; write it."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    start, stop = shard_ranges(source.count, num_shards)[shard]
    index = faiss.read_index(str(trained_path))
    add_vectors(index, source, chunk_size, start=start, stop=stop, gpu=gpu)
    store.write_faiss_index(index, out_path)
    return Path(out_path)


def merge_on_disk(
    trained_path: str | os.PathLike[str],
    shard_paths: Sequence[str | os.PathLike[str]],
    index_path: str | os.PathLike[str],
    ivfdata_path: str | os.PathLike[str],
) -> int:
    """Merge shard indexes into ``index_path`` + on-disk lists ``ivfdata_path``; return ntotal.

    ``index_path`` and ``ivfdata_path`` must be in the same folder (the index finds its lists by
    file name next to itself). Shard files are read memory-mapped, so the merge needs RAM for the
    quantizer only, not for the lists.
    """
    index_path, ivfdata_path = Path(index_path), Path(ivfdata_path)
    if index_path.parent.resolve() != ivfdata_path.parent.resolve():
        raise ValueError(f"{index_path} and {ivfdata_path} must be in the same folder")
    merged = faiss.read_index(str(trained_path))
    merged_ivf = faiss.extract_index_ivf(merged)
    if merged.ntotal != 0:
        raise ValueError(f"{trained_path}: the trained index must be empty, has {merged.ntotal}")

    shards = []
    lists = faiss.InvertedListsPtrVector()  # type: ignore[attr-defined]  # SWIG, not in stubs
    for p in shard_paths:
        shard = faiss.read_index(str(p), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(shard)
        if ivf.nlist != merged_ivf.nlist or ivf.code_size != merged_ivf.code_size:
            raise ValueError(
                f"{p}: nlist/code_size {ivf.nlist}/{ivf.code_size} differ from the trained "
                f"index's {merged_ivf.nlist}/{merged_ivf.code_size} (different training?)"
            )
        shards.append(shard)  # keep the shard (and its mapped lists) alive during the merge
        lists.push_back(ivf.invlists)

    ivfdata_path.unlink(missing_ok=True)
    try:
        # FAISS writes the lists file itself, under the name the index will refer to (so not
        # through atomic_output: callers merge in a work folder and rename the pair into place)
        ondisk = faiss.OnDiskInvertedLists(
            merged_ivf.nlist, merged_ivf.code_size, str(ivfdata_path)
        )
        # shift_ids=False: shards already carry global ids
        ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False, False)
    except BaseException as e:
        # a full disk surfaces as a bare RuntimeError from FAISS: say so, like atomic_output
        full = out_of_space(ivfdata_path, ivfdata_path, e)
        ivfdata_path.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    merged_ivf.ntotal = merged.ntotal = ntotal
    merged_ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # type: ignore[attr-defined]  # the index owns the lists now
    # Record the lists by file name only: readers resolve it next to the .index
    # (IO_FLAG_ONDISK_SAME_DIR), so the .index holds no machine path, and merges done in
    # different work folders (one machine, or --merge-parts) write byte-identical files.
    ondisk.filename = ivfdata_path.name
    with atomic_output(index_path) as tmp:
        faiss.write_index(merged, str(tmp))
    del merged, shards
    return int(ntotal)


def build_sharded_on_disk(
    trained: faiss.Index,
    source: VectorSource,
    index_dir: str | os.PathLike[str],
    name: str,
    num_shards: int,
    chunk_size: int = 65_536,
    gpu: GpuResources | None = None,
    log: Log = print,
) -> tuple[faiss.Index, list[str]]:
    """Shard-by-shard build + on-disk merge into ``index_dir/{name}.index`` + ``.ivfdata``.

    Returns the merged index opened memory-mapped from its final place (for tuning) and the
    extra file names (``[f"{name}.ivfdata"]``) to record in index.json.
    """
    d = Path(index_dir)
    work = d / f".{name}.shards{store_tmp_suffix()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        trained_path = work / "trained.index"
        save_trained(trained, trained_path)
        shard_paths = []
        for s in range(num_shards):
            t0 = time.perf_counter()
            shard_paths.append(
                build_shard(
                    trained_path,
                    source,
                    s,
                    num_shards,
                    work / f"shard_{s}.index",
                    chunk_size=chunk_size,
                    gpu=gpu,
                )
            )
            log(f"  shard {s + 1}/{num_shards} built in {time.perf_counter() - t0:.1f} s")
        ivfdata_name = f"{name}.ivfdata"
        # merge inside the work folder, then move both files into place (the index refers to
        # its lists by file name in its own folder, which IO_FLAG_ONDISK_SAME_DIR resolves)
        ntotal = merge_on_disk(
            trained_path, shard_paths, work / f"{name}.index", work / ivfdata_name
        )
        if ntotal != source.count:
            raise RuntimeError(f"merged {ntotal} vectors, expected {source.count}")
        with open(work / ivfdata_name, "rb+") as f:  # durable before it gets its final name
            os.fsync(f.fileno())
        os.replace(work / ivfdata_name, d / ivfdata_name)
        os.replace(work / f"{name}.index", d / f"{name}.index")
    except OutOfSpaceError as e:  # named as the file it was to become, not its work copy
        raise store.out_of_space_at(e, work, d) from e
    finally:
        shutil.rmtree(work, ignore_errors=True)
    index = faiss.read_index(
        str(d / f"{name}.index"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
    )
    return index, [ivfdata_name]


def store_tmp_suffix() -> str:
    """Per-process suffix for work folders (concurrent builds into one folder do not collide)."""
    return f"-tmp-{os.getpid()}"
