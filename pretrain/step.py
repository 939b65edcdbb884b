"""One optimizer step's forward and backward, with gradient accumulation that keeps the whole
accumulated batch as negatives (feature caching + re-forward, as open_clip's ``--accum-freq``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from clipforge.pretrain.losses import LossFn

_FEATURE_KEYS = ("image_features", "text_features")
_SCALAR_KEYS = ("logit_scale", "logit_bias")


def forward_backward(
    model: nn.Module,
    images: Tensor,
    texts: Tensor,
    loss_fn: LossFn,
    accum_steps: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Forward + backward of ``images`` (B, 3, H, W) and ``texts`` (B, L) into ``.grad``.

    With ``accum_steps = k > 1`` the batch is split into k micro-batches: (1) all k are
    forwarded without gradients and their features cached; (2) each micro-batch j is forwarded
    again with gradients, its rows replace the cached ones, and the loss over the FULL batch is
    backpropagated. Only micro-batch j's rows carry gradient in pass j (and 1/k of the logit
    scale/bias gradient), so the k backward passes sum to the gradient of the one-batch loss,
    while activation memory is that of one micro-batch. ``no_sync`` (DDP's ``model.no_sync``)
    wraps all but the last backward so that gradients are all-reduced once. Returns the
    (detached) full-batch loss and logit scale; a non-finite loss is returned as is, for the
    caller to handle.
    """
    batch = images.shape[0]
    if texts.shape[0] != batch:
        raise ValueError(f"{batch} images but {texts.shape[0]} texts in the batch")
    if accum_steps < 1 or batch % accum_steps:
        raise ValueError(f"batch of {batch} cannot be split into {accum_steps} equal micro-batches")

    def backward(loss: Tensor) -> None:
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

    if accum_steps == 1:
        with autocast():
            out = model(image=images, text=texts)
            loss = loss_fn(out)
        backward(loss)
        return {"loss": loss.detach(), "logit_scale": float(out["logit_scale"].detach())}
    return _accumulated(model, images, texts, loss_fn, accum_steps, autocast, no_sync, backward)


def _accumulated(
    model: nn.Module,
    images: Tensor,
    texts: Tensor,
    loss_fn: LossFn,
    accum_steps: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    backward: Callable[[Tensor], None],
) -> dict[str, Any]:
    """:func:`forward_backward` for ``accum_steps > 1``: cache every micro-batch's features
    without gradients, then re-forward each micro-batch with gradients against the cache."""
    image_chunks = images.chunk(accum_steps)
    text_chunks = texts.chunk(accum_steps)
    cached: dict[str, list[Tensor]] = {k: [] for k in _FEATURE_KEYS}
    with torch.no_grad(), autocast():
        for img, txt in zip(image_chunks, text_chunks, strict=True):
            out = model(image=img, text=txt)
            for key in _FEATURE_KEYS:
                cached[key].append(out[key])  # (B/k, D)
    loss_value = None
    for j, (img, txt) in enumerate(zip(image_chunks, text_chunks, strict=True)):
        last = j == accum_steps - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync:
            with autocast():
                out = model(image=img, text=txt)
                full = dict(out)
                # The scalars appear in all k full-batch losses: give each pass 1/k of their
                # gradient (same value, exactly) so the sum matches the one-batch gradient.
                for key in _SCALAR_KEYS:
                    if out.get(key) is not None:
                        value = out[key]
                        full[key] = value.detach() + (value - value.detach()) / accum_steps
                for key in _FEATURE_KEYS:
                    parts = [*cached[key][:j], out[key], *cached[key][j + 1 :]]
                    full[key] = torch.cat(parts)  # (B, D): only rows of micro-batch j need grad
                loss = loss_fn(full)
            backward(loss)
        loss_value = loss.detach()
    return {"loss": loss_value, "logit_scale": float(out["logit_scale"].detach())}
