"""Decoding query images with bounded work: sizes checked from the header, big images reduced.

An image that is small on disk can be huge in work. The pixel count alone does not bound it: a
200,000 x 1 one-bit PNG (103 bytes, 0.2 megapixels) is cheap to decode, but the model's
preprocessing scales its *shorter* side up to 224, which makes it 44.8 million x 224. So before
any pixel is decoded, :func:`decode_query_image` refuses, from the header's size:

- more than ``max_pixels`` pixels (413), PIL's decompression-bomb refusal included (413, not 400);
- a side longer than ``max_side`` (413);
- an aspect ratio beyond ``max_aspect`` (422): the upscale is then bounded by the ratio.

and bounds the decode and resize of what it accepts: a JPEG is decoded at 1/2, 1/4 or 1/8 scale
(libjpeg's DCT scaling, PIL ``draft``) and any other image is box-reduced by an integer factor
(PIL ``reduce``), so that the model's own resize starts from a shorter side between
``work_side`` and twice that. Images whose shorter side is under ``2 * work_side`` (every demo
image) reach the model exactly as decoded.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from clipforge.data_tools.images import to_rgb

from .http_guard import ApiError


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one query image (``clipforge-index serve`` sets the pixel limit)."""

    max_pixels: int = 40_000_000
    """Most pixels (width x height, from the header)."""
    max_side: int = 16_384
    """Longest side in pixels (WebP's own limit is 16,383)."""
    max_aspect: float = 20.0
    """Largest longer side / shorter side."""
    work_side: int = 1024
    """Larger images are reduced to a shorter side of ``work_side .. 2 * work_side`` before the
    model's preprocessing (which resizes to its input size, 224 for the demo model, anyway)."""

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_side", "work_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_aspect >= 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")


def check_image_size(width: int, height: int, limits: ImageLimits) -> None:
    """Raise :class:`ApiError` (413/422) for an image of this size that would cost too much."""
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ApiError(
            413, f"image is {width}x{height} = {pixels} pixels; the limit is {limits.max_pixels}"
        )
    if max(width, height) > limits.max_side:
        raise ApiError(
            413, f"image is {width}x{height}: a side over {limits.max_side} pixels is refused"
        )
    if min(width, height) < 1 or max(width, height) / min(width, height) > limits.max_aspect:
        raise ApiError(
            422,
            f"image is {width}x{height}: an aspect ratio over {limits.max_aspect:g}:1 is refused "
            "(the model would scale its short side up to its input size)",
        )


def decode_query_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode uploaded (or stored) bytes into a loaded RGB image, or raise :class:`ApiError`:
    400 for bytes that are not a decodable image, 413/422 for sizes :func:`check_image_size`
    refuses. The result's shorter side is at most ``2 * limits.work_side`` (or as decoded)."""
    if not data:
        raise ApiError(400, "the uploaded image is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as e:
        # PIL's own, fixed bomb limit fires inside open() for over ~179 megapixels.
        raise ApiError(413, f"image is too large to decode: {e}; the limit is "
                            f"{limits.max_pixels} pixels") from None  # fmt: skip
    except UnidentifiedImageError:
        raise ApiError(400, "the uploaded file is not an image (unrecognised format)") from None
    except Exception as e:  # a corrupt header: PIL raises many unrelated types
        raise ApiError(400, f"the uploaded file is not a decodable image ({e})") from None
    width, height = im.size
    check_image_size(width, height, limits)
    try:
        shorter = min(width, height)
        if im.format == "JPEG" and shorter >= 2 * limits.work_side:
            # DCT-domain scaling: the decoder itself does 1/4 or 1/64 of the work
            scale = limits.work_side / shorter
            im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        im.load()
        rgb = to_rgb(im)
        factor = min(rgb.size) // limits.work_side
        if factor >= 2:
            rgb = rgb.reduce(factor)  # box filter: one pass over the pixels, bounded output
    except ApiError:
        raise
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image is too large to decode: {e}") from None
    except Exception as e:
        # Untrusted bytes: PIL's decoders raise OSError, SyntaxError, ValueError, EOFError,
        # struct.error... depending on the format. Any of them means "not an image we can
        # read", which is the client's problem, never a 500.
        raise ApiError(400, f"the uploaded file is not a decodable image ({e})") from None
    return rgb


__all__ = ["ImageLimits", "check_image_size", "decode_query_image"]
