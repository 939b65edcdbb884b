"""Resuming a data stream on another world size: an exact pass re-split over the new readers
reads every sample of the epoch exactly once across the change (counted by key, on the demo
shards); resampled streams are re-seeded per (seed, step, rank, worker)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from clipforge.data_tools.demo import write_demo_shards
from clipforge.data_tools.reader import (
    ReaderConfig,
    ShardLoader,
    StreamPosition,
    make_loader,
    parse_shard_spec,
)
from clipforge.data_tools.resplit import reseed_resampled, resplit_exact_pass
from clipforge.data_tools.transforms import clip_image_transforms

SEED, BUFFER = 4, 50
CONFIG = ReaderConfig(batch_size=16, shuffle_buffer=BUFFER, seed=SEED)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_shards(out)
    return out


def _loader(
    demo_dir: Path, rank: int, world: int, workers: int, position: StreamPosition
) -> ShardLoader:
    transform, _ = clip_image_transforms(8)
    return make_loader(
        demo_dir, transform, config=CONFIG, num_workers=workers, rank=rank, world_size=world,
        position=position,
    )  # fmt: skip


def _read(loader: ShardLoader, batches: int | None = None) -> list[str]:
    """Keys of the next ``batches`` batches of the current pass (None: the rest of it)."""
    keys: list[str] = []
    for n, batch in enumerate(loader, 1):
        keys += batch["key"]
        if batches is not None and n == batches:
            break
    return keys


def _resplit(
    demo_dir: Path, positions: list[StreamPosition], world: int, workers: int
) -> list[StreamPosition]:
    return resplit_exact_pass(
        parse_shard_spec(str(demo_dir)), positions, seed=SEED, shuffle_buffer=BUFFER,
        world_size=world, workers=workers,
    )  # fmt: skip


def _all_keys(demo_dir: Path) -> Counter[str]:
    return Counter(_read(_loader(demo_dir, 0, 1, 0, StreamPosition())))


@pytest.mark.parametrize(
    ("old", "new", "taken"),
    [((2, 2), (1, 1), (5, 9)), ((1, 1), (2, 2), (7,)), ((2, 1), (3, 2), (0, 12))],
    ids=["2x2->1x1", "1x1->2x2", "2x1->3x2"],
)
def test_a_resplit_pass_reads_every_key_of_the_epoch_once(
    demo_dir: Path, old: tuple[int, int], new: tuple[int, int], taken: tuple[int, ...]
) -> None:
    (old_world, old_workers), (new_world, new_workers) = old, new
    seen: Counter[str] = Counter()
    positions = []
    for rank in range(old_world):  # each old rank read part of the epoch, then was stopped
        loader = _loader(demo_dir, rank, old_world, old_workers, StreamPosition())
        seen.update(_read(loader, taken[rank]) if taken[rank] else [])
        positions.append(loader.position)
    assert sum(seen.values()) == sum(taken) * CONFIG.batch_size
    new_positions = _resplit(demo_dir, positions, new_world, new_workers)
    shares = []
    for rank, position in enumerate(new_positions):
        keys = _read(_loader(demo_dir, rank, new_world, new_workers, position))
        shares.append(len(keys))
        seen.update(keys)
    assert seen == _all_keys(demo_dir)  # all 1,911 keys, each exactly once
    assert set(seen.values()) == {1} and len(seen) == 1911
    assert min(shares) > 0  # the unopened shards were dealt to every new rank


def test_ranks_in_different_epochs_and_a_second_change_stay_exact(demo_dir: Path) -> None:
    # Rank 0 of 2 finishes epoch 0 and reads into epoch 1; rank 1 is still in epoch 0.
    epoch0: Counter[str] = Counter()
    epoch1: Counter[str] = Counter()
    ahead = _loader(demo_dir, 0, 2, 1, StreamPosition())
    epoch0.update(_read(ahead))
    epoch1.update(_read(ahead, 6))
    behind = _loader(demo_dir, 1, 2, 1, StreamPosition())
    epoch0.update(_read(behind, 10))
    assert (ahead.position.epoch, behind.position.epoch) == (1, 0)

    # 2 -> 1 rank: rank 0 of 1 now has a plan for epoch 0 and for epoch 1.
    (position,) = _resplit(demo_dir, [ahead.position, behind.position], 1, 2)
    assert [e for e, _ in position.plans] == [0, 1]
    single = _loader(demo_dir, 0, 1, 2, position)
    epoch0.update(_read(single))  # the rest of epoch 0
    epoch1.update(_read(single, 4))  # part of epoch 1's plan, then another change
    assert single.planned(1)

    # 1 -> 3 ranks in the middle of a planned epoch: the plan's stream is replayed whole.
    again = _resplit(demo_dir, [single.position], 3, 1)
    for rank, position in enumerate(again):
        epoch1.update(_read(_loader(demo_dir, rank, 3, 1, position)))
    everything = _all_keys(demo_dir)
    assert epoch0 == everything and epoch1 == everything

    # after the planned epochs, the next one splits as usual over the new world size
    later = _loader(demo_dir, 0, 3, 1, again[0])
    _read(later)
    assert later.position == StreamPosition(epoch=2, consumed=(0,), next_worker=0)
    assert not later.planned(2)


def test_positions_with_plans_survive_a_checkpoint_round_trip(demo_dir: Path) -> None:
    loader = _loader(demo_dir, 0, 1, 2, StreamPosition())
    _read(loader, 3)
    (position,) = _resplit(demo_dir, [loader.position], 1, 2)
    again = _resplit(demo_dir, [position], 2, 1)[1]
    assert StreamPosition.from_dict(again.to_dict()) == again
    # checkpoints written before plans existed load as positions without plans
    assert StreamPosition.from_dict({"epoch": 3, "consumed": [1, 2], "next_worker": 1}) == (
        StreamPosition(3, (1, 2), 1)
    )


def test_resampled_streams_are_reseeded_per_step_and_rank(demo_dir: Path) -> None:
    transform, _ = clip_image_transforms(8)
    config = ReaderConfig(batch_size=16, resampled=True, shuffle_buffer=BUFFER, seed=SEED)

    def first(position: StreamPosition, rank: int, world: int) -> list[str]:
        loader = make_loader(
            demo_dir, transform, config=config, num_workers=1, rank=rank, world_size=world,
            position=position,
        )  # fmt: skip
        return _read(loader, 2)

    at_7 = reseed_resampled(7, 2, 1)
    streams = [first(p, rank, 2) for rank, p in enumerate(at_7)]
    assert streams[0] != streams[1]  # no two ranks draw the same stream
    assert first(reseed_resampled(7, 2, 1)[0], 0, 2) == streams[0]  # reproducible
    assert first(reseed_resampled(8, 2, 1)[0], 0, 2) != streams[0]  # seeded by the step
    assert first(StreamPosition(), 0, 2) != streams[0]  # not the stream the run began with
