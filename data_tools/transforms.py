"""Image transforms for the streaming reader, split into a per-sample and a per-batch half.

The per-sample half (in data-loader workers) does the geometric work on the PIL image and returns
``uint8`` tensors; the per-batch half converts the stacked batch to float and normalises it in one
vectorised operation. The composition gives exactly what open_clip's ``image_transform`` gives
(``Resize`` + ``CenterCrop`` or ``RandomResizedCrop``, then ``ToTensor`` + ``Normalize``), for less
work per sample, and lets a trainer move ``uint8`` batches to the GPU (4x fewer bytes) and
normalise there.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

# open_clip's defaults (OpenAI CLIP's dataset statistics).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` uint8 tensor (no copy of the pixel data beyond one)."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def random_resized_crop_params(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop: torchvision's RandomResizedCrop algorithm.

    Drawn from a Python RNG: ~50x cheaper than torchvision's one-element tensor draws.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_w = round(math.sqrt(target_area * aspect))
        crop_h = round(math.sqrt(target_area / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, height - crop_h), rng.randint(0, width - crop_w), crop_h, crop_w
    # Fallback, as torchvision: the central crop with the ratio clamped into range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        crop_w, crop_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        crop_h, crop_w = height, round(height * max(ratio))
    else:
        crop_w, crop_h = width, height
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


@dataclass(frozen=True)
class StyleAugment:
    """Photometric augmentations that change how an image is drawn, not what it shows: colour
    jitter, grayscale and Gaussian blur, each drawn per sample (after the crop, before tensor
    conversion). They are for transfer across image styles (a model trained on one emoji font
    tested on another); open_clip's training transform has none of them. All off by default.
    """

    color_jitter: float = 0.0
    """Strength s of the colour jitter (0: off): brightness, contrast and saturation factors
    drawn uniformly from [1 - s, 1 + s] (floored at 0) and a hue shift from [-s/4, s/4] turns
    (at most 0.5), applied in that order to 80 % of the samples (SimCLR's recipe)."""
    grayscale: float = 0.0
    """Probability of turning a sample to grayscale (kept as 3 channels)."""
    blur: float = 0.0
    """Probability of a Gaussian blur, sigma uniform in [0.1, 2.0] x side / 64 pixels (PIL's
    GaussianBlur: ~50x faster on a small image than torchvision's tensor convolution)."""

    def __post_init__(self) -> None:
        for name, value, top in (
            ("color_jitter", self.color_jitter, 2.0),
            ("grayscale", self.grayscale, 1.0),
            ("blur", self.blur, 1.0),
        ):
            if not 0.0 <= value <= top:
                raise ValueError(f"{name} must be in [0, {top}], got {value}")

    @property
    def active(self) -> bool:
        """Whether any augmentation is on."""
        return bool(self.color_jitter or self.grayscale or self.blur)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        s = self.color_jitter
        if s and rng.random() < 0.8:
            low = max(0.0, 1.0 - s)
            img = F.adjust_brightness(img, rng.uniform(low, 1.0 + s))
            img = F.adjust_contrast(img, rng.uniform(low, 1.0 + s))
            img = F.adjust_saturation(img, rng.uniform(low, 1.0 + s))
            hue = min(0.5, s / 4)
            img = F.adjust_hue(img, rng.uniform(-hue, hue))
        if self.grayscale and rng.random() < self.grayscale:
            img = F.rgb_to_grayscale(img, num_output_channels=3)
        if self.blur and rng.random() < self.blur:
            sigma = rng.uniform(0.1, 2.0) * max(img.width, img.height) / 64
            img = img.filter(ImageFilter.GaussianBlur(radius=sigma))
        return img


@dataclass(frozen=True)
class ClipSampleTransform:
    """Per-sample half: resize shorter side + centre crop (eval) or random-resized-crop (train),
    then the optional style augmentations (training only: eval and embedding never set them)."""

    size: int
    """Output side length in pixels."""
    train: bool = False
    """Random-resized-crop (open_clip's training transform) instead of resize + centre crop."""
    scale: tuple[float, float] = (0.9, 1.0)
    """Area range of the random crop (open_clip's default)."""
    style: StyleAugment = StyleAugment()
    """Colour jitter / grayscale / blur, applied after the crop or resize (off by default)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        bicubic = T.InterpolationMode.BICUBIC
        if self.train:
            # The reader seeds torch's generator per sample position; deriving the crop from it
            # makes the augmentation of a sample independent of what was read before it.
            rng = random.Random(torch.initial_seed())
            top, left, h, w = random_resized_crop_params(img.width, img.height, rng, self.scale)
            img = F.resized_crop(img, top, left, h, w, [self.size, self.size], bicubic)
        else:
            img = F.resize(img, self.size, bicubic)
            if img.size != (self.size, self.size):  # a square image needs no crop (and copy)
                img = F.center_crop(img, [self.size, self.size])
        if self.style.active:
            # Its own stream (a string seed), so turning it on leaves every crop unchanged.
            img = self.style(img, random.Random(f"style:{torch.initial_seed()}"))
        return pil_to_uint8_tensor(img)  # (3, S, S) uint8


@dataclass(frozen=True)
class CaptionPartsSubset:
    """Caption augmentation for tag-list captions (``"cat face, animal, pet"``): with probability
    ``name_only`` the caption becomes its name alone, with probability ``prob`` a random
    non-empty subset of its comma-separated parts, in order; otherwise it stays as written.

    A model trained on whole tag lists only has never seen a short query such as "cat face";
    sampling k of the n parts (k uniform in 1..n, then which k uniformly) shows it the name
    alone, single tags and every mixture. Subsets show the bare name rarely (1/n^2 of them), so
    a model that must answer names needs ``name_only`` too. Captions with one part are returned
    unchanged.

    The name is the caption's first part, or, with ``name_field``, that field of the sample's
    .json when the caption starts with it: names may hold commas ("kiss: woman, man"), which
    then stay one part instead of being cut.
    """

    prob: float
    """Probability that a caption with several parts is replaced by a subset of them."""
    name_only: float = 0.0
    """Probability that a caption with several parts is replaced by its name alone
    (``prob + name_only`` <= 1)."""
    name_field: str = ""
    """Field of the sample's .json holding the name the caption starts with ("" : the first
    comma-separated part is the name)."""

    def __post_init__(self) -> None:
        if not (0 <= self.prob <= 1 and 0 <= self.name_only <= 1):
            raise ValueError(
                f"caption probabilities must be in [0, 1], got prob={self.prob}, "
                f"name_only={self.name_only}"
            )
        if self.prob + self.name_only > 1 + 1e-9:
            raise ValueError(f"prob + name_only must be <= 1, got {self.prob} + {self.name_only}")

    def parts(self, caption: str, meta: Any = None) -> list[str]:
        """The caption's parts, the name first (one part even if it holds commas)."""
        name = meta.get(self.name_field) if self.name_field and isinstance(meta, dict) else None
        head: list[str] = []
        rest = caption
        if isinstance(name, str) and name.strip() and caption.startswith(name.strip()):
            tail = caption[len(name.strip()) :]
            if not tail.strip() or tail.lstrip().startswith(","):
                head, rest = [name.strip()], tail
        return head + [p.strip() for p in rest.split(",") if p.strip()]

    def __call__(self, caption: str, meta: Any = None) -> str:
        parts = self.parts(caption, meta)
        if len(parts) < 2:
            return caption
        # The reader seeds torch's generator per sample position (see ClipSampleTransform); a
        # string seed gives this transform its own stream, independent of the crop's.
        rng = random.Random(f"caption:{torch.initial_seed()}")
        draw = rng.random()
        if draw < self.name_only:
            return parts[0]
        if draw >= self.name_only + self.prob:
            return caption
        keep = sorted(rng.sample(range(len(parts)), rng.randint(1, len(parts))))
        return ", ".join(parts[i] for i in keep)


@dataclass(frozen=True)
class NormalizeBatch:
    """Per-batch half: ``(B, 3, H, W)`` uint8 -> float32 scaled to [0, 1] and normalised."""

    mean: Sequence[float] = CLIP_MEAN
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: Sequence[float] = CLIP_STD
    """Per-channel standard deviation divided by."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        mean = torch.as_tensor(self.mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        # Same operation order as ToTensor + Normalize, so results match bit for bit.
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)  # (B, 3, H, W)


def clip_image_transforms(
    size: int,
    train: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    crop_scale_min: float = 0.9,
    style: StyleAugment = StyleAugment(),
) -> tuple[Callable[[Image.Image], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The (per-sample, per-batch) pair equivalent to ``open_clip.image_transform(size, train)``.

    Eval: bit-identical output. Train: the same random-resized-crop distribution and resampling
    (with the defaults; ``crop_scale_min`` below 0.9 crops harder, ``style`` adds photometric
    augmentations).
    """
    if size <= 0:
        raise ValueError(f"image size must be positive, got {size}")
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean/std must be 3 values each (std > 0), got {mean} / {std}")
    if not 0.0 < crop_scale_min <= 1.0:
        raise ValueError(f"crop_scale_min must be in (0, 1], got {crop_scale_min}")
    return (
        ClipSampleTransform(size, train, (crop_scale_min, 1.0), style),
        NormalizeBatch(tuple(mean), tuple(std)),
    )
