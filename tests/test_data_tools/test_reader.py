"""The streaming reader on real shards: splitting, mixing, error counting, exact resume."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipforge.data_tools.demo import write_demo_shards
from clipforge.data_tools.reader import (
    DataError,
    ReaderConfig,
    ShardSpecError,
    StreamPosition,
    count_samples,
    make_loader,
    parse_shard_spec,
)
from clipforge.data_tools.transforms import (
    CaptionPartsSubset,
    clip_image_transforms,
    pil_to_uint8_tensor,
    random_resized_crop_params,
)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_shards(out)
    return out


def _png(color: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _keys(loader) -> list[str]:
    return [k for batch in loader for k in batch["key"]]


def test_exact_pass_over_2_ranks_x_2_workers_reads_every_sample_once(demo_dir: Path) -> None:
    transform, _ = clip_image_transforms(32)
    seen: list[str] = []
    for rank in range(2):
        loader = make_loader(
            demo_dir,
            transform,
            config=ReaderConfig(batch_size=50),
            num_workers=2,
            rank=rank,
            world_size=2,
        )
        seen += _keys(loader)
    assert count_samples(str(demo_dir)) == 1911
    assert len(seen) == 1911
    assert len(set(seen)) == 1911


def test_exact_pass_with_shuffle_still_reads_every_sample_once(demo_dir: Path) -> None:
    transform, _ = clip_image_transforms(16)
    config = ReaderConfig(batch_size=64, shuffle_buffer=100, seed=3)
    keys = _keys(make_loader(str(demo_dir), transform, config=config, num_workers=2))
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 1911
    in_order = _keys(
        make_loader(str(demo_dir), transform, config=ReaderConfig(batch_size=64), num_workers=0)
    )
    assert keys != in_order  # shuffled


def test_too_few_shards_for_readers_is_refused_clearly(demo_dir: Path) -> None:
    transform, _ = clip_image_transforms(16)
    with pytest.raises(ShardSpecError, match=r"8 shard\(s\) for 4 rank\(s\) x 3 worker"):
        make_loader(demo_dir, transform, num_workers=3, rank=0, world_size=4)


def test_resampled_mixing_follows_weights(tmp_path: Path) -> None:
    # Small shards: many shard draws per sample read, so the observed ratio is tight around 1:3.
    for source in ("a", "b"):
        (tmp_path / source).mkdir()
        for s in range(3):
            members = []
            for i in range(4):
                members += [
                    (f"{source}{s}_{i}.png", _png((i, 0, 0), size=4)),
                    (f"{source}{s}_{i}.txt", f"{source} {i}".encode()),
                ]
            _write_tar(tmp_path / source / f"{s}.tar", members)
    transform, _ = clip_image_transforms(8)
    spec = f"{tmp_path / 'a'}@1::{tmp_path / 'b'}@3"
    loader = make_loader(
        spec, transform, config=ReaderConfig(batch_size=100, resampled=True, seed=1), num_workers=0
    )
    counts: Counter[str] = Counter()
    for n, batch in enumerate(loader):
        counts.update(c[0] for c in batch["caption"])
        if n == 39:
            break
    # 4,000 samples = 1,000 shard draws; source a expects 250 +- 14 of them.
    ratio = counts["b"] / counts["a"]
    assert 2.5 < ratio < 3.6, counts


def test_corrupt_samples_are_counted_not_fatal(tmp_path: Path) -> None:
    members = []
    for i in range(10):
        members.append((f"s{i:02d}.png", b"not a png" if i == 3 else _png((i, i, i))))
        if i != 5:
            members.append((f"s{i:02d}.txt", f"caption {i}".encode()))
    members.append(("s10.txt", b"caption without image"))
    members += [("s11.png", _png((1, 2, 3))), ("s11.txt", b"\xff\xfe bad utf8")]
    _write_tar(tmp_path / "0.tar", members)
    # a truncated second shard: cut inside the data of its third member
    good = [(f"t{i}.png", _png((9, 9, 9))) for i in range(4)]
    good = [m for i, g in enumerate(good) for m in (g, (f"t{i}.txt", b"t"))]
    _write_tar(tmp_path / "1.tar", good)
    data = (tmp_path / "1.tar").read_bytes()
    (tmp_path / "1.tar").write_bytes(data[: len(data) // 2])

    transform, _ = clip_image_transforms(8)
    loader = make_loader(tmp_path, transform, config=ReaderConfig(batch_size=4), num_workers=2)
    keys = _keys(loader)
    assert dict(loader.skipped) == {
        "corrupt_image": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "bad_caption": 1,
        "truncated_shard": 1,
    }
    assert "s03" not in keys and "s05" not in keys
    assert sum(k.startswith("s") for k in keys) == 8  # s00..s09 less s03 and s05
    assert 0 < sum(k.startswith("t") for k in keys) < 4  # the samples before the cut

    strict = make_loader(
        tmp_path, transform, num_workers=0, config=ReaderConfig(batch_size=4, on_error="raise")
    )
    with pytest.raises(DataError, match=r"0\.tar:s03: corrupt_image"):
        _keys(strict)


def test_reads_img2dataset_layout(tmp_path: Path) -> None:
    members = []
    for i in range(6):
        buf = io.BytesIO()
        Image.new("RGB", (40, 30), (200, i * 10, 0)).save(buf, "JPEG")
        key = f"00000{i:04d}"
        meta = {
            "url": f"http://x/{i}.jpg",
            "key": key,
            "status": "success",
            "width": 40,
            "height": 30,
            "original_width": 400,
            "original_height": 300,
        }
        members += [
            (f"{key}.jpg", buf.getvalue()),
            (f"{key}.txt", f"photo {i}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    _write_tar(tmp_path / "00000.tar", members)
    transform, normalize = clip_image_transforms(24)
    (batch,) = list(
        make_loader(
            str(tmp_path / "00000.tar"),
            transform,
            normalize,
            config=ReaderConfig(batch_size=8),
            num_workers=0,
        )
    )
    assert batch["image"].shape == (6, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["caption"] == [f"photo {i}" for i in range(6)]
    assert batch["meta"][2]["url"] == "http://x/2.jpg"


def test_split_transform_equals_open_clip_eval_transform() -> None:
    import open_clip

    rng = np.random.default_rng(0)
    per_sample, per_batch = clip_image_transforms(32)
    reference = open_clip.image_transform(32, is_train=False)
    for shape in [(50, 70, 3), (70, 50, 3), (32, 32, 3)]:
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        assert torch.equal(per_batch(per_sample(img)[None])[0], reference(img))


def test_train_transform_is_torchvision_random_resized_crop() -> None:
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (72, 80, 3), dtype=np.uint8))
    per_sample, _ = clip_image_transforms(24, train=True)
    areas = []
    for seed in range(200):
        torch.default_generator.manual_seed(seed)
        top, left, h, w = random_resized_crop_params(80, 72, random.Random(seed))
        assert 0 <= top <= 72 - h and 0 <= left <= 80 - w
        areas.append(h * w / (72 * 80))
        expected = F.resized_crop(img, top, left, h, w, [24, 24], InterpolationMode.BICUBIC)
        assert torch.equal(per_sample(img), pil_to_uint8_tensor(expected))
    assert min(areas) >= 0.88 and max(areas) <= 1.0 and np.std(areas) > 0.01
    # a degenerate aspect ratio falls back to the central crop with the ratio clamped
    assert random_resized_crop_params(400, 10, random.Random(0)) == (0, 193, 10, 13)


def _first_batches(
    demo_dir: Path, position: StreamPosition, n: int, **loader_kwargs: object
) -> tuple[list[dict], StreamPosition]:
    """The first ``n`` batches of a seeded, shuffled, augmenting 2-worker stream from
    ``position``, and the position after them."""
    transform, normalize = clip_image_transforms(16, train=True)
    config = ReaderConfig(batch_size=32, resampled=True, shuffle_buffer=64, seed=5)
    loader = make_loader(
        demo_dir, transform, normalize, config=config, num_workers=2, position=position,
        **loader_kwargs,
    )  # fmt: skip
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out, loader.position


def test_resume_from_position_continues_exactly(demo_dir: Path) -> None:
    full, _ = _first_batches(demo_dir, StreamPosition(), 7)
    first, position = _first_batches(demo_dir, StreamPosition(), 3)
    rest, _ = _first_batches(demo_dir, position, 4)
    assert [b["key"] for b in first + rest] == [b["key"] for b in full]
    for a, b in zip(first + rest, full, strict=True):
        assert torch.equal(a["image"], b["image"])  # same augmentation too


def test_exact_pass_epochs_and_resume(demo_dir: Path) -> None:
    transform, _ = clip_image_transforms(8)
    config = ReaderConfig(batch_size=100, shuffle_buffer=50, seed=2)
    loader = make_loader(demo_dir, transform, config=config, num_workers=2)
    epoch0 = _keys(loader)
    assert loader.position == StreamPosition(epoch=1, consumed=(0, 0), next_worker=0)
    epoch1 = _keys(loader)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # reshuffled per epoch

    partial = make_loader(
        demo_dir, transform, config=config, num_workers=2, position=StreamPosition(epoch=1)
    )
    head = []
    for batch in partial:
        head += batch["key"]
        if len(head) >= 500:
            break
    tail = _keys(
        make_loader(demo_dir, transform, config=config, num_workers=2, position=partial.position)
    )
    assert head + tail == epoch1


def test_shard_spec_forms(demo_dir: Path, tmp_path: Path) -> None:
    names = sorted(p.name for p in demo_dir.glob("*.tar"))
    (source,) = parse_shard_spec(str(demo_dir / "emoji-{000000..000003}.tar"))
    assert [Path(u).name for u in source.urls] == names[:4]
    assert source.samples == sum(
        json.loads((demo_dir / "manifest.json").read_text())["shards"][i]["samples"]
        for i in range(4)
    )
    (globbed,) = parse_shard_spec(str(demo_dir / "emoji-00000[67].tar"))
    assert len(globbed.urls) == 2
    a, b = parse_shard_spec(f"{demo_dir}@0.5::{demo_dir / 'emoji-000000.tar'}")
    assert (a.weight, b.weight, len(a.urls), len(b.urls)) == (0.5, 1.0, 8, 1)
    with pytest.raises(ShardSpecError, match="no such shard"):
        parse_shard_spec(str(demo_dir / "emoji-{000000..000009}.tar"))
    with pytest.raises(ShardSpecError, match="weight"):
        parse_shard_spec(f"{demo_dir}@-1")
    with pytest.raises(ShardSpecError, match=r"no \.tar shards"):
        parse_shard_spec(str(tmp_path))
    with pytest.raises(ShardSpecError, match="empty"):
        parse_shard_spec("")


def test_caption_subsets_are_in_order_seeded_and_resume_exactly(demo_dir: Path) -> None:
    subsets = CaptionPartsSubset(1.0)
    caption = "cat face, animal, cat, face, pet"
    parts = caption.split(", ")
    seen = set()
    for seed in range(200):
        torch.manual_seed(seed)
        out = subsets(caption).split(", ")
        assert out and all(p in parts for p in out)
        assert out == sorted(out, key=parts.index)  # order kept
        torch.manual_seed(seed)
        assert subsets(caption).split(", ") == out  # the sample's seed decides
        seen.add(len(out))
    assert seen == {1, 2, 3, 4, 5}
    assert subsets("rocket") == "rocket"  # one part: unchanged
    assert CaptionPartsSubset(0.0)(caption) == caption

    # through the reader: captions are augmented, and a resumed stream repeats them exactly
    def run(position: StreamPosition, n: int, prob: float = 0.5) -> tuple[list, StreamPosition]:
        batches, after = _first_batches(
            demo_dir, position, n, caption_transform=CaptionPartsSubset(prob)
        )
        return [b["caption"] for b in batches], after

    full, _ = run(StreamPosition(), 5)
    first, position = run(StreamPosition(), 2)
    rest, _ = run(position, 3)
    assert first + rest == full
    written, _ = run(StreamPosition(), 5, prob=0.0)  # the same samples, captions as written
    pairs = [(a, w) for batch_a, batch_w in zip(full, written, strict=True)
             for a, w in zip(batch_a, batch_w, strict=True)]  # fmt: skip
    for augmented, original in pairs:
        assert set(augmented.split(", ")) <= set(original.split(", "))
    changed = sum(a != w for a, w in pairs)
    assert 0.2 * len(pairs) < changed < 0.6 * len(pairs)  # ~half of the multi-part captions


def test_caption_name_only_keeps_names_with_commas_whole(demo_dir: Path) -> None:
    meta = {"name": "kiss: woman, man"}
    caption = "kiss: woman, man, couple, love"
    named = CaptionPartsSubset(0.3, name_only=0.5, name_field="name")
    assert named.parts(caption, meta) == ["kiss: woman, man", "couple", "love"]
    # without the field (or a caption that does not start with it) the first part is the name
    assert CaptionPartsSubset(0.3).parts(caption, meta)[0] == "kiss: woman"
    assert named.parts("couple, love", meta) == ["couple", "love"]
    outs = []
    for seed in range(1000):
        torch.manual_seed(seed)
        outs.append(named(caption, meta))
    share_name = outs.count("kiss: woman, man") / len(outs)
    assert 0.5 < share_name < 0.62  # 0.5 name alone + a subset's 1/3 x 1/3 of 0.3
    assert 0.22 < outs.count(caption) / len(outs) < 0.38  # 0.2 as written + 1/3 of 0.3
    assert all(o == caption or set(named.parts(o, meta)) <= set(named.parts(caption, meta))
               for o in outs)  # fmt: skip
    assert "kiss: woman" not in outs  # the name is never cut at its comma
    assert named("rocket", {"name": "rocket"}) == "rocket"  # one part: unchanged
    with pytest.raises(ValueError, match="prob \\+ name_only must be <= 1"):
        CaptionPartsSubset(0.6, name_only=0.5)

    # through the reader: the demo's .json names reach the transform, so about half of the
    # captions with tags become exactly their sample's name
    def captions(transform: CaptionPartsSubset | None) -> list[tuple[str, str]]:
        batches, _ = _first_batches(demo_dir, StreamPosition(), 2, caption_transform=transform)
        rows = [zip(b["caption"], b["meta"], strict=True) for b in batches]
        return [(c, m["name"]) for batch in rows for c, m in batch]

    written = captions(None)
    named_out = captions(CaptionPartsSubset(0.0, name_only=0.5, name_field="name"))
    tagged = [(o, n) for (o, n), (c, _) in zip(written, named_out, strict=True) if o != n]
    bare = [c == n for (o, n), (c, _) in zip(written, named_out, strict=True) if o != n]
    assert len(tagged) > 20 and 0.3 < sum(bare) / len(bare) < 0.7
