"""Data positions for a resume on another world size (another number of ranks x workers).

Resampled streams (:func:`reseed_resampled`): every new reader starts a fresh stream whose seed
is ``(seed, step, rank, worker)``, ``step`` being the step the run resumes from. No two readers
share a seed, and a run resumed on the same sequence of world sizes at the same steps draws the
same samples again. Nothing of the old streams is carried over: resampled streams have no
"rest of the epoch" to finish.

Exact passes (:func:`resplit_exact_pass`): every sample of an epoch must still be read exactly
once. Each old reader's stream is cut in two. Its *opened* shards (those its shuffle buffer had
pulled samples from) are replayed undecoded by one new reader with the old reader's seed, so
the buffer yields the same order, and the samples it had delivered are dropped: what is left is
exactly what it had not delivered. Its *unopened* shards go to a pool dealt round-robin over the
new readers. The cut is made by the manifests' sample counts; an old reader whose counts are
unknown, or which was itself reading a re-split plan, is replayed whole. Ranks that were in
different epochs (one rank's shards ran out first) get a plan for each epoch from the oldest to
the newest one in progress. Later epochs split as usual over the new world size.
"""

from __future__ import annotations

from collections.abc import Sequence

from clipforge.data_tools.reader import (
    ReaderPlan,
    Replay,
    ShardSource,
    StreamPosition,
    exact_pass_shards,
)


def reseed_resampled(step: int, world_size: int, workers: int) -> list[StreamPosition]:
    """Fresh resampled streams for ``world_size`` ranks, seeded by ``step`` (see the module)."""
    n = max(workers, 1)
    return [StreamPosition(epoch=step, consumed=(0,) * n) for _ in range(world_size)]


def _opened(shards: Sequence[str], counts: dict[str, int | None], pulled: int) -> int | None:
    """How many leading ``shards`` a reader that pulled ``pulled`` samples had opened (None:
    a count is unknown, so the cut cannot be made)."""
    total = 0
    for k, url in enumerate(shards):
        if total >= pulled:
            return k
        count = counts.get(url)
        if count is None:
            return None
        total += count
    return len(shards)


def resplit_exact_pass(
    sources: Sequence[ShardSource],
    positions: Sequence[StreamPosition],
    *,
    seed: int,
    shuffle_buffer: int,
    world_size: int,
    workers: int,
) -> list[StreamPosition]:
    """New data positions, one per new rank, that read the rest of each epoch in progress
    exactly once over ``world_size`` ranks x ``workers`` workers (see the module).

    ``positions``: the old ranks' positions, in rank order, as a checkpoint stores them.
    ``seed`` and ``shuffle_buffer`` are the run's ``train.seed`` and ``data.shuffle_buffer``
    (they fix the old readers' shard lists and shuffle order).
    """
    if not positions:
        raise ValueError("no data positions to re-split")
    old_workers = max(len(positions[0].consumed), 1)
    if any(len(p.consumed) not in (0, old_workers) for p in positions):
        raise ValueError(
            "the saved data positions disagree on the number of data workers: "
            f"{[len(p.consumed) for p in positions]}"
        )
    old_readers = len(positions) * old_workers
    n_new = max(workers, 1)
    new_readers = world_size * n_new
    urls = [u for s in sources for u in s.urls]
    counts = {u: c for s in sources for u, c in zip(s.urls, s.sample_counts, strict=False)}
    # the buffer holds this many samples beyond those it has yielded
    ahead = shuffle_buffer if shuffle_buffer > 1 else 0

    first, last = min(p.epoch for p in positions), max(p.epoch for p in positions)
    per_epoch: list[tuple[int, list[ReaderPlan]]] = []
    for epoch in range(first, last + 1):
        replays: list[Replay] = []
        pool: list[str] = []
        for rank, pos in enumerate(positions):
            if pos.epoch > epoch:
                continue  # this rank had finished that epoch
            for worker in range(old_workers):
                reader = rank * old_workers + worker
                plan = pos.plan_for(epoch, worker) or ReaderPlan(
                    shards=tuple(
                        exact_pass_shards(urls, epoch, seed, shuffle_buffer, reader, old_readers)
                    )
                )
                delivered = pos.consumed[worker] if pos.epoch == epoch and pos.consumed else 0
                stream_seed = (seed, epoch, rank, worker)
                if delivered == 0 and not plan.replays:
                    pool.extend(plan.shards)  # nothing of it was read: all of it is new
                    continue
                cut = None if plan.replays else _opened(plan.shards, counts, delivered + ahead)
                if cut is None:  # replayed whole: exact, only less evenly spread
                    replays.append(Replay(plan, stream_seed, delivered))
                    continue
                opened = ReaderPlan(shards=plan.shards[:cut])
                check = delivered + ahead if cut < len(plan.shards) else None
                replays.append(Replay(opened, stream_seed, delivered, check))
                pool.extend(plan.shards[cut:])
        plans = [
            ReaderPlan(tuple(replays[j::new_readers]), tuple(pool[j::new_readers]))
            for j in range(new_readers)
        ]
        per_epoch.append((epoch, plans))

    return [
        StreamPosition(
            epoch=first,
            consumed=(0,) * n_new,
            plans=tuple(
                (epoch, tuple(plans[rank * n_new + w] for w in range(n_new)))
                for epoch, plans in per_epoch
            ),
        )
        for rank in range(world_size)
    ]


__all__ = ["reseed_resampled", "resplit_exact_pass"]
