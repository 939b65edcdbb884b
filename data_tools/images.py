"""Image decoding, colour conversion, resizing and encoding for shard writing.

Pure functions over PIL images. The one subtle step is colour conversion: images with transparency
(RGBA, LA, palette + tRNS) are alpha-composited onto a background colour. A bare
``img.convert("RGB")`` drops alpha and exposes whatever colour happens to be stored in fully
transparent pixels (the Noto emoji PNGs store black or junk there).
"""

from __future__ import annotations

import io
from typing import Literal

from PIL import Image, ImageOps

ResizeMode = Literal["center_crop", "keep_ratio", "pad", "none"]
RESIZE_MODES: tuple[str, ...] = ("center_crop", "keep_ratio", "pad", "none")
ImageFormat = Literal["jpg", "webp", "png"]
IMAGE_FORMATS: tuple[str, ...] = ("jpg", "webp", "png")
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")

_PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
_EXIF_ORIENTATION = 0x0112
# Orientations 5-8 turn the image by 90 degrees: stored width and height swap.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (the message says why)."""


EXTENSION_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
"""PIL's format name for each image member extension of a shard."""


def decode_image(
    data: bytes, draft_size: int | None = None, extension: str | None = None
) -> Image.Image:
    """Decode image bytes fully, apply the EXIF orientation, and return the PIL image.

    ``draft_size`` lets the JPEG decoder skip work by decoding at 1/2, 1/4 or 1/8 scale while the
    result stays at least ``draft_size`` on its shorter side (a large speed-up for big photos).
    The returned image then is smaller than the original: use :func:`decode_image_sized` when
    the original size matters. ``extension`` (the shard member's, "jpg") is tried first as the
    format (see :func:`decode_image_sized`).
    """
    return decode_image_sized(data, draft_size, extension)[0]


def _open(data: bytes, extension: str | None) -> Image.Image:
    """``Image.open``, trying the format ``extension`` names first: PIL otherwise probes its
    plugins one by one (a third of a small WebP's decode time). Bytes that are not what their
    extension says are still opened, by the full probe."""
    fmt = EXTENSION_FORMATS.get(extension.lower()) if extension else None
    if fmt is not None:
        try:
            return Image.open(io.BytesIO(data), formats=[fmt])
        except Image.UnidentifiedImageError:
            pass  # mislabelled: e.g. PNG bytes in a .jpg member
    return Image.open(io.BytesIO(data))


def decode_image_sized(
    data: bytes, draft_size: int | None = None, extension: str | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """:func:`decode_image`, plus the original (width, height) after EXIF orientation.

    The original size is read from the header before any draft-mode reduction, so it is the
    input image's size even when the decoder skipped work (the returned image may be smaller).
    """
    try:
        img = _open(data, extension)
        width, height = img.size
        if img.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
            width, height = height, width
        if draft_size is not None and img.format == "JPEG":
            w, h = img.size
            scale = draft_size / min(w, h)
            if scale < 0.5:
                img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place keeps img.format
    except Image.UnidentifiedImageError:
        raise ImageDecodeError("not an image in a format PIL can read") from None
    except Exception as e:  # PIL raises many unrelated types for bad data
        raise ImageDecodeError(f"{type(e).__name__}: {e}") from None
    return img, (width, height)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto ``background``."""
    if img.mode == "RGB":
        return img
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale into 8 bits instead of clipping everything to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def resize_image(
    img: Image.Image,
    size: int,
    mode: ResizeMode,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Resize an RGB image.

    - ``center_crop``: shorter side to ``size``, then the central ``size`` x ``size`` square.
    - ``keep_ratio``: longer side to ``size``, aspect ratio kept.
    - ``pad``: longer side to ``size``, then centred on a ``size`` x ``size`` background square.
    - ``none``: unchanged.
    """
    if mode == "none":
        return img
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    w, h = img.size
    if mode == "center_crop":
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        img = _resize(img, (new_w, new_h))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return img.crop((left, top, left + size, top + size))
    scale = size / max(w, h)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    img = _resize(img, (new_w, new_h))
    if mode == "keep_ratio":
        return img
    canvas = Image.new("RGB", (size, size), background)
    canvas.paste(img, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def _resize(img: Image.Image, new_size: tuple[int, int]) -> Image.Image:
    if img.size == new_size:
        return img
    # reducing_gap lets PIL box-reduce large downscales first: same look, several times faster.
    return img.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_image(img: Image.Image, fmt: ImageFormat, quality: int = 95) -> bytes:
    """Encode an RGB image as jpg/webp (with ``quality``) or png (lossless)."""
    if fmt not in _PIL_FORMAT:
        raise ValueError(f"image format {fmt!r} is not one of {', '.join(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG", optimize=False, compress_level=6)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        img.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    return buf.getvalue()
