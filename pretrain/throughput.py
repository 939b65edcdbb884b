"""Throughput accounting for the training log: samples/s, data wait, FLOPs and MFU.

:class:`StepWindow` sums the steps since the last log line; :func:`count_flops_per_sample` counts
a model's FLOPs once at setup; :func:`utilization` turns both into TFLOP/s and MFU per device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clipforge.pretrain.pooled_forward import full_context_tokens

# Dense bf16 peak FLOP/s per GPU, for the MFU estimate (matched on the device name).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


@dataclass(frozen=True)
class FlopsPerSample:
    """Forward + backward FLOPs of one sample, split so that text trimming can be counted."""

    image: float
    """The image tower's FLOPs per sample."""
    text_per_position: float
    """The text tower's FLOPs per sample and per text position that runs."""


class StepWindow:
    """Throughput and data-wait over the steps since the last log line."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.samples = 0
        self.data_s = 0.0
        self.total_s = 0.0
        self.text_positions = 0.0
        self.steps = 0

    def add(self, samples: int, data_s: float, total_s: float, text_positions: float) -> None:
        """One step: ``samples`` over all ranks, ``data_s`` of its ``total_s`` spent waiting for
        the batch, ``text_positions`` the mean text positions its captions ran."""
        self.samples += samples
        self.data_s += data_s
        self.total_s += total_s
        self.text_positions += text_positions
        self.steps += 1

    def flush(self, loss: float, logit_scale: float, grad_norm: float) -> dict[str, Any]:
        """The log line's step figures (the last step's loss, scale and norm, the window's rates);
        starts a new window."""
        out = {
            "loss": loss,
            "logit_scale": round(float(logit_scale), 4),
            "temperature": round(1.0 / float(logit_scale), 5) if logit_scale else float("nan"),
            "grad_norm": round(grad_norm, 4),
            "samples_per_s": round(self.samples / self.total_s, 2) if self.total_s else 0.0,
            "data_wait_frac": round(self.data_s / self.total_s, 4) if self.total_s else 0.0,
            "text_positions": round(self.text_positions / self.steps, 2) if self.steps else 0.0,
        }
        self._reset()
        return out


def count_flops_per_sample(model: nn.Module, model_cfg: dict[str, Any]) -> FlopsPerSample:
    """Forward + backward FLOPs of one sample, counted once on a 2-sample batch, backward taken
    as 2x forward (an estimate for MFU; frozen towers make the true figure lower). The text
    tower is counted over the whole context and scaled by the positions each step actually runs
    (text trimming), linearly: attention's quadratic term is < L / (12 x width) of the tower."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    images = torch.zeros(2, 3, size, size)  # (2, 3, H, W)
    texts = full_context_tokens(model, 2, ctx)  # (2, ctx): the pooled token last, all positions run
    image_counter, text_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    towers: Any = model  # open_clip's encode_image/encode_text, which nn.Module's type lacks
    with torch.no_grad():
        with image_counter:
            towers.encode_image(images)
        with text_counter:
            towers.encode_text(texts)
    return FlopsPerSample(
        image=3 * image_counter.get_total_flops() / 2,
        text_per_position=3 * text_counter.get_total_flops() / 2 / ctx,
    )


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak FLOP/s, if it is a GPU :data:`PEAK_BF16_FLOPS` knows."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def utilization(
    flops: FlopsPerSample,
    text_positions: float,
    samples_per_s: float,
    world_size: int,
    device: torch.device,
) -> dict[str, float]:
    """``tflops_per_device`` and, on a known GPU, ``mfu`` (achieved / peak) at ``samples_per_s``
    over ``world_size`` devices whose captions ran ``text_positions`` positions on average."""
    per_sample = flops.image + flops.text_per_position * text_positions
    achieved = per_sample * samples_per_s / world_size
    out = {"tflops_per_device": round(achieved / 1e12, 3)}
    peak = peak_flops(device)
    if peak:
        out["mfu"] = round(achieved / peak, 4)
    return out


__all__ = [
    "PEAK_BF16_FLOPS",
    "FlopsPerSample",
    "StepWindow",
    "count_flops_per_sample",
    "peak_flops",
    "utilization",
]
