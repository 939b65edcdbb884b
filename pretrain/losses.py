"""Contrastive losses over features gathered across ranks with gradients.

Each rank computes its LOCAL rows against the GLOBAL batch: memory O(local x global), never the
global x global matrix. With DDP's gradient averaging, the mean of the per-rank losses and the
averaged gradients equal the single-process loss and gradients on the concatenated batch (tested
against that oracle on 2-process gloo). Every rank must hold the same local batch size (the
trainer drops incomplete batches), since labels are offset by ``rank x B_local``.

Mined hard negatives (``data.hard_negatives``) are extra captions per sample, (B_local, k, D)
features from the same text tower with a (B_local, k) mask of the real ones: they become extra
columns of their own image's row only (image->text only; no image is their positive; not
gathered), masked slots at -inf. Text->image is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[dict[str, Any]], Tensor]
"""Maps an open_clip forward dict (image_features, text_features, logit_scale[, logit_bias]
[, negative_features, negative_mask]) to the scalar loss of this rank."""

LOSS_KINDS = ("infonce", "siglip")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (B_local, ...) along dim 0 -> (world x B_local, ...), with gradients
    flowing back to each rank's own rows. Identity on a single process."""
    _rank, world = _world()
    if world == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def _negative_logits(
    image_features: Tensor,
    negative_features: Tensor,
    negative_mask: Tensor | None,
    logit_scale: Tensor,
) -> tuple[Tensor, Tensor]:
    """Each local image against ITS OWN k hard negatives: ``(logits, mask)``, both (B_local, k),
    the logits without bias and with masked slots left as computed (each loss drops them its
    own way), the mask checked to be there.

    Only its own: another sample's mined captions may hold this image's caption (mining keeps
    a sample's own caption out of its own list only), and scored against this image such a
    column would be a false negative, as high as the positive. Row-local, so no gather either.
    """
    if negative_mask is None:
        raise ValueError("negative_features given without negative_mask")
    logits = logit_scale * torch.einsum("bd,bkd->bk", image_features, negative_features)
    return logits, negative_mask


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    gather: bool = True,
    negative_features: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """Symmetric InfoNCE / NT-Xent (CLIP).

    ``image_features``/``text_features``: (B_local, D) L2-normalised; ``logit_scale``: the
    exponentiated inverse temperature. Mean over local rows of (CE(i->t) + CE(t->i)) / 2.
    ``negative_features`` (B_local, k, D) L2-normalised with ``negative_mask`` (B_local, k)
    bool (True: a real negative): each image's own mined captions as k extra image->text
    columns, masked ones at -inf (all masked: exactly the plain loss).
    """
    rank, world = _world() if gather else (0, 1)
    local = image_features.shape[0]
    if gather and world > 1:
        all_images = gather_with_grad(image_features)  # (B_global, D)
        all_texts = gather_with_grad(text_features)  # (B_global, D)
    else:
        all_images, all_texts = image_features, text_features
    logits_per_image = logit_scale * image_features @ all_texts.T  # (B_local, B_global)
    logits_per_text = logit_scale * text_features @ all_images.T  # (B_local, B_global)
    if negative_features is not None:
        extra, mask = _negative_logits(
            image_features, negative_features, negative_mask, logit_scale
        )
        # -inf: a masked slot gets probability 0 and no gradient, as if the column were absent
        extra = extra.masked_fill(~mask, float("-inf"))
        logits_per_image = torch.cat([logits_per_image, extra], dim=1)  # (B_local, B_global + k)
    labels = torch.arange(local, device=image_features.device) + rank * local
    return (
        F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
    ) / 2


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    gather: bool = True,
    negative_features: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: -sum log sigmoid(y * (s * <i, t> + b)) / B_local, with
    y = +1 for the matching pair and -1 for every other pair of the global batch. Hard
    negatives (as :func:`contrastive_loss` takes them) add one pair labelled -1 per local image
    and real negative of its own; masked slots add nothing."""
    rank, world = _world() if gather else (0, 1)
    local = image_features.shape[0]
    all_texts = gather_with_grad(text_features) if gather and world > 1 else text_features
    logits = logit_scale * image_features @ all_texts.T + logit_bias  # (B_local, B_global)
    targets = -torch.ones_like(logits)
    idx = torch.arange(local, device=logits.device)
    targets[idx, idx + rank * local] = 1.0
    loss = -F.logsigmoid(targets * logits).sum()
    if negative_features is not None:
        extra, mask = _negative_logits(
            image_features, negative_features, negative_mask, logit_scale
        )
        # where(), not a product with the mask: an excluded pair contributes exactly 0
        pair = -F.logsigmoid(-(extra + logit_bias))  # (B_local, k): labelled -1
        loss = loss + torch.where(mask, pair, torch.zeros_like(pair)).sum()
    return loss / local


def make_loss(kind: str) -> LossFn:
    """The loss of ``kind`` (``infonce`` | ``siglip``) as a function of the model's forward dict."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"loss kind {kind!r} is not one of {', '.join(LOSS_KINDS)}")

    def loss_fn(out: dict[str, Any]) -> Tensor:
        negatives, mask = out.get("negative_features"), out.get("negative_mask")
        if kind == "infonce":
            return contrastive_loss(
                out["image_features"],
                out["text_features"],
                out["logit_scale"],
                negative_features=negatives,
                negative_mask=mask,
            )
        if out.get("logit_bias") is None:
            raise ValueError(
                "the siglip loss needs a model with a logit_bias (build it with init_logit_bias)"
            )
        return siglip_loss(
            out["image_features"],
            out["text_features"],
            out["logit_scale"],
            out["logit_bias"],
            negative_features=negatives,
            negative_mask=mask,
        )

    return loss_fn
