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
_NEGATIVE_KEY = "negative_features"
_SCALAR_KEYS = ("logit_scale", "logit_bias")


def _forward(
    model: nn.Module, images: Tensor, texts: Tensor, negatives: Tensor | None
) -> dict[str, Any]:
    """The model's forward dict; with ``negatives`` (b, k, L) also ``negative_features``
    (b, k, D). The negatives run through the text tower in the same call as the captions: one
    forward per backward, as DDP and FSDP expect, and the same weights for both."""
    if negatives is None:
        return dict(model(image=images, text=texts))
    b, k, length = negatives.shape
    if texts.shape[1] != length:
        raise ValueError(f"captions have {texts.shape[1]} tokens but hard negatives {length}")
    out = dict(model(image=images, text=torch.cat([texts, negatives.reshape(b * k, length)])))
    features = out["text_features"]  # (b + b*k, D)
    out["text_features"] = features[:b]  # (b, D)
    out[_NEGATIVE_KEY] = features[b:].reshape(b, k, -1)  # (b, k, D)
    return out


def forward_backward(
    model: nn.Module,
    images: Tensor,
    texts: Tensor,
    loss_fn: LossFn,
    accum_steps: int = 1,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    grad_scaler: torch.amp.GradScaler | None = None,
    negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> dict[str, Any]:
    """Forward + backward of ``images`` (B, 3, H, W) and ``texts`` (B, L) into ``.grad``.

    ``negatives`` (B, k, L) are mined hard-negative captions with ``negative_mask`` (B, k)
    bool (True: real): their features (same text tower, same forward) reach ``loss_fn`` as
    ``negative_features`` (B, k, D) and ``negative_mask``, accumulated like the captions'.

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
    if negatives is not None and (
        negative_mask is None
        or negatives.shape[0] != batch
        or tuple(negative_mask.shape) != tuple(negatives.shape[:2])
    ):
        raise ValueError(
            "hard negatives need a (B, k, L) tensor and a (B, k) mask for the batch of "
            f"{batch}; got {tuple(negatives.shape)} and "
            f"{None if negative_mask is None else tuple(negative_mask.shape)}"
        )

    def backward(loss: Tensor) -> None:
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()

    if accum_steps == 1:
        with autocast():
            out = _forward(model, images, texts, negatives)
            if negatives is not None:
                out["negative_mask"] = negative_mask
            loss = loss_fn(out)
        backward(loss)
        return {"loss": loss.detach(), "logit_scale": float(out["logit_scale"].detach())}
    return _accumulated(
        model,
        images,
        texts,
        loss_fn,
        accum_steps,
        autocast,
        no_sync,
        backward,
        negatives,
        negative_mask,
    )


def _accumulated(
    model: nn.Module,
    images: Tensor,
    texts: Tensor,
    loss_fn: LossFn,
    accum_steps: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    backward: Callable[[Tensor], None],
    negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> dict[str, Any]:
    """:func:`forward_backward` for ``accum_steps > 1``: cache every micro-batch's features
    without gradients, then re-forward each micro-batch with gradients against the cache."""
    image_chunks = images.chunk(accum_steps)
    text_chunks = texts.chunk(accum_steps)
    negative_chunks = (
        negatives.chunk(accum_steps) if negatives is not None else (None,) * accum_steps
    )
    feature_keys = (*_FEATURE_KEYS, _NEGATIVE_KEY) if negatives is not None else _FEATURE_KEYS
    cached: dict[str, list[Tensor]] = {k: [] for k in feature_keys}
    chunks = list(zip(image_chunks, text_chunks, negative_chunks, strict=True))
    with torch.no_grad(), autocast():
        for img, txt, neg in chunks:
            out = _forward(model, img, txt, neg)
            for key in feature_keys:
                cached[key].append(out[key])  # (B/k, D), negatives (B/k, n, D)
    loss_value = None
    for j, (img, txt, neg) in enumerate(chunks):
        last = j == accum_steps - 1
        sync = contextlib.nullcontext() if (last or no_sync is None) else no_sync()
        with sync:
            with autocast():
                out = _forward(model, img, txt, neg)
                full = dict(out)
                if negatives is not None:
                    full["negative_mask"] = negative_mask  # (B, n): the whole batch's
                # The scalars appear in all k full-batch losses: give each pass 1/k of their
                # gradient (same value, exactly) so the sum matches the one-batch gradient.
                for key in _SCALAR_KEYS:
                    if out.get(key) is not None:
                        value = out[key]
                        full[key] = value.detach() + (value - value.detach()) / accum_steps
                for key in feature_keys:
                    parts = [*cached[key][:j], out[key], *cached[key][j + 1 :]]
                    full[key] = torch.cat(parts)  # (B, D): only rows of micro-batch j need grad
                loss = loss_fn(full)
            backward(loss)
        loss_value = loss.detach()
    return {"loss": loss_value, "logit_scale": float(out["logit_scale"].detach())}
