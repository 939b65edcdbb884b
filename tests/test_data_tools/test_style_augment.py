"""Style augmentations (colour jitter, grayscale, blur) and the crop strength: each does what
its docstring says on a real image, deterministically per sample seed, and leaves the crop
stream untouched."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image, ImageFilter

from clipforge.data_tools.transforms import (
    StyleAugment,
    clip_image_transforms,
    pil_to_uint8_tensor,
    random_resized_crop_params,
)
from clipforge.pretrain.config import ConfigError, DataConfig


@pytest.fixture
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    # a smooth colour gradient plus noise: blur, jitter and grayscale all change it visibly
    ys, xs = np.mgrid[0:48, 0:48]
    base = np.stack([xs * 5, ys * 5, 255 - xs * 3], axis=-1) + rng.integers(0, 40, (48, 48, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def test_off_by_default_and_crops_unchanged_when_on(image: Image.Image) -> None:
    plain, _ = clip_image_transforms(32, train=True)
    styled, _ = clip_image_transforms(32, train=True, style=StyleAugment(grayscale=1.0))
    for seed in range(5):
        torch.manual_seed(seed)
        crop = plain(image)
        torch.manual_seed(seed)
        gray = styled(image)
        # grayscale of the same crop: the crop did not move when the style stream was added
        expected = F.rgb_to_grayscale(Image.fromarray(crop.permute(1, 2, 0).numpy()), 3)
        assert torch.equal(gray, pil_to_uint8_tensor(expected))
        assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_blur_and_jitter_follow_their_draws(image: Image.Image) -> None:
    side = 32
    blur, _ = clip_image_transforms(side, train=True, style=StyleAugment(blur=1.0))
    jitter, _ = clip_image_transforms(side, train=True, style=StyleAugment(color_jitter=0.5))
    seed = 11
    torch.manual_seed(seed)
    top, left, h, w = random_resized_crop_params(48, 48, random.Random(seed))
    cropped = F.resized_crop(image, top, left, h, w, [side, side], F.InterpolationMode.BICUBIC)
    # blur: the style stream's first draw decides, its second is sigma
    style_rng = random.Random(f"style:{seed}")
    assert style_rng.random() < 1.0
    sigma = style_rng.uniform(0.1, 2.0) * side / 64
    expected = cropped.filter(ImageFilter.GaussianBlur(radius=sigma))
    torch.manual_seed(seed)
    assert torch.equal(blur(image), pil_to_uint8_tensor(expected))
    # jitter: applied to ~80 % of samples, each changes the pixels, none changes the shape
    changed = 0
    for s in range(40):
        torch.manual_seed(s)
        out = jitter(image)
        torch.manual_seed(s)
        changed += not torch.equal(out, clip_image_transforms(side, train=True)[0](image))
        assert out.shape == (3, side, side) and out.dtype == torch.uint8
    assert 24 <= changed <= 39  # binomial(40, 0.8): outside this range p < 0.2 %


def test_crop_scale_min_crops_harder(image: Image.Image) -> None:
    areas = []
    for seed in range(300):
        _, _, h, w = random_resized_crop_params(48, 48, random.Random(seed), (0.3, 1.0))
        areas.append(h * w / 48**2)
    assert min(areas) < 0.4 and max(areas) <= 1.0
    with pytest.raises(ValueError, match="crop_scale_min"):
        clip_image_transforms(32, train=True, crop_scale_min=0.0)


def test_style_applies_without_random_crop(image: Image.Image) -> None:
    styled, _ = clip_image_transforms(32, style=StyleAugment(grayscale=1.0))
    plain, _ = clip_image_transforms(32)
    torch.manual_seed(0)
    expected = F.rgb_to_grayscale(Image.fromarray(plain(image).permute(1, 2, 0).numpy()), 3)
    assert torch.equal(styled(image), pil_to_uint8_tensor(expected))


@pytest.mark.parametrize(
    ("field", "value"),
    [("color_jitter", -0.1), ("grayscale", 1.5), ("blur", -1.0), ("crop_scale_min", 0.0)],
)
def test_config_refuses_out_of_range(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"data.{field}"):
        DataConfig(**{field: value})
