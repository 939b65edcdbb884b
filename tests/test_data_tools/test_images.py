"""Image handling through the writer: resize modes, EXIF orientation, transparency and colour
modes, --min-size, and the stored encodings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from clipforge.data_tools.images import ImageDecodeError, resize_image
from clipforge.data_tools.writer import WriteConfig, write_shards

from .shard_helpers import all_samples, image_bytes, pattern_image

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _thirds(size: tuple[int, int]) -> Image.Image:
    """Red | green | blue in vertical thirds."""
    w, h = size
    img = Image.new("RGB", size, RED)
    img.paste(GREEN, (w // 3, 0, 2 * w // 3, h))
    img.paste(BLUE, (2 * w // 3, 0, w, h))
    return img


def _folder(root: Path, images: dict[str, bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}", encoding="utf-8")
    return root


def _by_source(out: Path, ext: str) -> dict[str, tuple[Image.Image, dict[str, object]]]:
    """source -> (stored image, its .json) for every sample written to ``out``."""
    result = {}
    for members in all_samples(out).values():
        meta = json.loads(members["json"])
        result[meta["source"]] = (Image.open(io.BytesIO(members[ext])), meta)
    return result


def _close(pixel: tuple[int, ...], expected: tuple[int, int, int], tol: int = 40) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


@pytest.mark.parametrize(
    ("mode", "wide_size", "tall_size"),
    [
        ("center_crop", (16, 16), (16, 16)),
        ("keep_ratio", (16, 8), (6, 16)),
        ("pad", (16, 16), (16, 16)),
        ("none", (60, 30), (20, 50)),
    ],
)
def test_resize_mode_gives_its_output_size_and_keeps_the_content_centred(
    mode: str, wide_size: tuple[int, int], tall_size: tuple[int, int], tmp_path: Path
) -> None:
    wide, tall = _thirds((60, 30)), _thirds((20, 50))
    src = _folder(tmp_path / "src", {"wide.png": image_bytes(wide), "tall.png": image_bytes(tall)})
    background = (10, 20, 30)
    config = WriteConfig(image_size=16, resize_mode=mode, image_format="png", background=background)
    write_shards(src, tmp_path / "out", config, progress=False)

    stored = _by_source(tmp_path / "out", "png")
    for name, original, size in (("wide.png", wide, wide_size), ("tall.png", tall, tall_size)):
        img, meta = stored[name]
        assert img.size == size
        assert (meta["width"], meta["height"]) == size
        assert (meta["original_width"], meta["original_height"]) == original.size
        w, h = size
        assert _close(img.getpixel((w // 2, h // 2)), GREEN)  # the middle stays the middle
    if mode == "none":  # untouched, lossless
        assert stored["wide.png"][0].convert("RGB").tobytes() == wide.tobytes()
    if mode == "pad":
        # the wide image is 16x8 centred on a 16x16 square: 4 background rows above and below
        img = stored["wide.png"][0].convert("RGB")
        assert img.getpixel((8, 0)) == img.getpixel((8, 15)) == background
        assert _close(img.getpixel((1, 8)), RED) and _close(img.getpixel((14, 8)), BLUE)
    if mode == "center_crop":
        # the wide image loses its sides: the crop's edges lie inside the red and blue thirds
        img = stored["wide.png"][0].convert("RGB")
        assert _close(img.getpixel((0, 8)), RED) and _close(img.getpixel((15, 8)), BLUE)


def test_resize_image_handles_extreme_aspect_ratios_and_rejects_bad_arguments() -> None:
    sliver = Image.new("RGB", (1000, 3), RED)
    assert resize_image(sliver, 16, "center_crop").size == (16, 16)
    assert resize_image(sliver, 16, "keep_ratio").size == (16, 1)  # never 0 pixels high
    assert resize_image(sliver, 16, "pad").size == (16, 16)
    with pytest.raises(ValueError, match="resize mode 'stretch' is not one of"):
        resize_image(sliver, 16, "stretch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="image size must be positive, got 0"):
        resize_image(sliver, 0, "pad")


def test_exif_orientation_is_applied_before_resizing(tmp_path: Path) -> None:
    # stored 40x20, red left half / blue right half, EXIF says "rotate 90 degrees clockwise"
    img = Image.new("RGB", (40, 20), RED)
    img.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    src = _folder(tmp_path / "src", {"phone.jpg": image_bytes(img, "JPEG", exif=exif)})
    for mode, size in (("none", (20, 40)), ("keep_ratio", (8, 16))):
        out = tmp_path / mode
        write_shards(
            src, out, WriteConfig(image_size=16, resize_mode=mode, image_format="png"), False
        )
        stored, meta = _by_source(out, "png")["phone.jpg"]
        assert stored.size == size
        # upright: what was on the left is now on top
        assert _close(stored.getpixel((size[0] // 2, 1)), RED)
        assert _close(stored.getpixel((size[0] // 2, size[1] - 2)), BLUE)
        assert (meta["original_width"], meta["original_height"]) == (20, 40)


def test_transparency_is_composited_onto_the_background_and_colour_modes_become_rgb(
    tmp_path: Path,
) -> None:
    # RGBA: the left half is fully transparent but stores pure red ("junk" colour)
    rgba = Image.new("RGBA", (8, 4), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (4, 0, 8, 4))
    # palette with a transparent index that also holds red
    pal = Image.new("P", (8, 4), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255, 200, 100, 50] + [0] * 759)
    pal.paste(1, (4, 0, 6, 4))
    pal.paste(2, (6, 0, 8, 4))
    opaque_pal = pal.copy()
    pal.info["transparency"] = 0
    grey_alpha = Image.new("LA", (8, 4), (200, 0))
    grey_alpha.paste((50, 255), (4, 0, 8, 4))
    grey16 = Image.new("I;16", (8, 4), 65535)
    for x, y in ((x, y) for x in range(4, 8) for y in range(4)):
        grey16.putpixel((x, y), 4096)  # (paste() of an int into I;16 stores 0 in Pillow 13)
    src = _folder(
        tmp_path / "src",
        {
            "rgba.png": image_bytes(rgba),
            "palette_transparent.png": image_bytes(pal, transparency=0),
            "palette.png": image_bytes(opaque_pal),
            "grey.png": image_bytes(Image.new("L", (8, 4), 77)),
            "grey_alpha.png": image_bytes(grey_alpha),
            "grey16.png": image_bytes(grey16),
        },
    )
    out = tmp_path / "out"
    config = WriteConfig(resize_mode="none", image_format="png", background=GREEN)
    write_shards(src, out, config, progress=False)

    stored = {name: img.convert("RGB") for name, (img, _) in _by_source(out, "png").items()}
    assert all(img.size == (8, 4) for img in stored.values())
    assert all(Image.open(io.BytesIO(m["png"])).mode == "RGB" for m in all_samples(out).values())

    def left_right(name: str) -> tuple[tuple[int, ...], ...]:
        return stored[name].getpixel((1, 1)), stored[name].getpixel((7, 1))

    assert left_right("rgba.png") == (GREEN, BLUE)  # no red: transparent pixels show background
    assert left_right("palette_transparent.png") == (GREEN, (200, 100, 50))
    assert stored["palette_transparent.png"].getpixel((4, 1)) == BLUE
    assert left_right("palette.png") == (RED, (200, 100, 50))  # no tRNS: red is a real colour
    assert left_right("grey.png") == ((77, 77, 77), (77, 77, 77))
    assert left_right("grey_alpha.png") == (GREEN, (50, 50, 50))
    # 16-bit grey is scaled into 8 bits, not clipped to white
    assert left_right("grey16.png") == ((255, 255, 255), (16, 16, 16))


def test_junk_colour_under_transparency_does_not_bleed_into_a_resized_jpeg(tmp_path: Path) -> None:
    # fully transparent everywhere, red underneath: resized and stored as jpg it must be white
    invisible = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    src = _folder(tmp_path / "src", {"ghost.png": image_bytes(invisible)})
    write_shards(src, tmp_path / "out", WriteConfig(image_size=16), progress=False)
    stored, _ = _by_source(tmp_path / "out", "jpg")["ghost.png"]
    assert stored.size == (16, 16)
    assert all(
        _close(stored.getpixel((x, y)), (255, 255, 255), tol=3)
        for x in range(16)
        for y in range(16)
    )


def test_min_size_skips_images_by_their_original_shorter_side(tmp_path: Path) -> None:
    src = _folder(
        tmp_path / "src",
        {
            "thin.png": image_bytes(pattern_image((300, 99), 1)),  # shorter side 99 < 100
            "square.png": image_bytes(pattern_image((100, 100), 2)),  # exactly 100: kept
            # a large JPEG is decoded reduced (draft mode) when the target is small; its original
            # size, not the reduced one, decides --min-size and is recorded in the .json
            "photo.jpg": image_bytes(pattern_image((400, 200), 3), "JPEG"),
        },
    )
    out = tmp_path / "out"
    result = write_shards(src, out, WriteConfig(image_size=32, min_size=100), progress=False)

    assert result.stats["failures"] == {"too_small": 1}
    assert result.stats["failure_examples"][0]["where"] == "thin.png"
    assert result.stats["failure_examples"][0]["detail"] == "300x99 < min_size 100"
    stored = _by_source(out, "jpg")
    assert sorted(stored) == ["photo.jpg", "square.png"]
    img, meta = stored["photo.jpg"]
    assert img.size == (32, 32)
    assert (meta["original_width"], meta["original_height"]) == (400, 200)
    assert result.stats["image_width"]["max"] == 400


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_images_are_re_encoded_in_the_chosen_format(
    fmt: str, pil_format: str, tmp_path: Path
) -> None:
    src = _folder(
        tmp_path / "src",
        {
            "from_jpeg.jpg": image_bytes(pattern_image((48, 40), 1), "JPEG"),
            "from_png.png": image_bytes(pattern_image((48, 40), 2)),
            "from_webp.webp": image_bytes(pattern_image((48, 40), 3), "WEBP"),
        },
    )
    out = tmp_path / "out"
    result = write_shards(src, out, WriteConfig(image_size=24, image_format=fmt), progress=False)

    samples = all_samples(out)
    assert len(samples) == 3
    for members in samples.values():
        assert sorted(members) == sorted(["json", "txt", fmt])
        img = Image.open(io.BytesIO(members[fmt]))
        assert (img.format, img.mode, img.size) == (pil_format, "RGB", (24, 24))
    # what was read is counted by input format, not by the stored one
    assert result.stats["image_formats"] == {"jpeg": 1, "png": 1, "webp": 1}
    assert result.manifest.writer["image_format"] == fmt


def test_quality_setting_changes_the_stored_jpeg(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"a.png": image_bytes(pattern_image((64, 64), 5))})
    sizes = {}
    for quality in (30, 95):
        out = tmp_path / f"q{quality}"
        write_shards(src, out, WriteConfig(image_size=64, quality=quality), progress=False)
        (members,) = all_samples(out).values()
        sizes[quality] = len(members["jpg"])
    # a noisy pattern compresses much better at low quality
    assert sizes[30] < 0.7 * sizes[95]


def test_the_member_extension_is_a_hint_that_mislabelled_bytes_survive() -> None:
    from clipforge.data_tools.images import decode_image

    buf = io.BytesIO()
    Image.new("RGB", (5, 3), (200, 10, 10)).save(buf, format="PNG")
    png = buf.getvalue()
    for extension in ("png", "jpg", "webp", "JPEG", None):  # a .jpg member holding a PNG
        img = decode_image(png, extension=extension)
        assert (img.format, img.size, img.getpixel((0, 0))) == ("PNG", (5, 3), (200, 10, 10))
    with pytest.raises(ImageDecodeError):
        decode_image(b"not an image", extension="jpg")
