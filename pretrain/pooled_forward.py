"""Compute only what the pooled features depend on: exact, and the cheapest speed-up there is.

A CLIP tower's output is read at one position per sample: the class token of a ViT with ``tok``
pooling, the EOT token (``argmax`` pooling) or first EOS token (``eos``) of a causal text tower.
open_clip computes a good deal that never reaches that position:

1. **Text padding.** Every caption is padded to the context length (77 in the CLIP configs) and
   the text transformer runs over all of it. Captions are short (the demo's are 10 tokens on
   average, web alt-text about 15). With a causal mask, position p depends only on tokens 0..p,
   so running rows on their first ``max(pooled position) + 1`` columns gives the same features.
   Rows are grouped by that need (up to 4 groups, so that one 77-token caption does not make a
   whole web batch run the whole context), each group's length rounded up to a multiple of 8
   (kernel-friendly shapes, few distinct shapes for ``torch.compile``).
2. **The last block's other positions.** In a tower's last block only the pooled position's
   query, attention output and MLP reach the output; the other positions contribute only keys
   and values, which come from the block's input. Running the last block's query side for the
   pooled position alone saves ~5/6 of that block: 1/7 of a 6-block tower, 1/14 of ViT-B's 12.

Both give the same features and gradients as open_clip's forward, up to float summation order
(tested in float64 against open_clip's own code). They are switched on only where that holds:
a plain ``ResidualAttentionBlock`` stack (``nn.MultiheadAttention``, batch first), a ViT with
``tok`` pooling and no attention pooler, a causal text tower without an appended class token;
anything else (bidirectional SigLIP text towers, Hugging Face towers, CoCa) runs unchanged.
Switching replaces module classes by subclasses that differ only in ``forward``, so parameters,
state-dict keys, checkpoints and exports are untouched (the device FSDP2 uses for its modules).
"""

from __future__ import annotations

from typing import Any, cast

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import (
    ResidualAttentionBlock,
    TextTransformer,
    Transformer,
    VisionTransformer,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

OpenClipTower = Any
"""A text tower as open_clip builds it (CLIP itself or a TextTransformer). Its parts are reached by
attribute (``transformer``, ``token_embedding``, ``attn_mask``...), which ``nn.Module``'s typing
would read as ``Tensor | Module``; the code checks the real classes before switching a tower."""

TRIM_MULTIPLE = 8
"""Text lengths run are rounded up to a multiple of this (capped at the context length)."""
MIN_GROUP_ROWS = 32
"""A batch is split by caption length into groups of at least this many rows..."""
MAX_GROUPS = 4
"""...and at most this many: each group still makes large matrix products."""


def pooled_positions(text: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """(B,) the position each row's text feature is read at, as open_clip's pooling reads it."""
    if pool_type == "argmax":
        return text.argmax(dim=-1)  # the EOT token has the highest id
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("pool type 'eos' needs the tokenizer's EOS id; the tower has none")
        return text.eq(eos_id).int().argmax(dim=-1)  # first EOS, 0 when none
    raise ValueError(f"pool type {pool_type!r} has no single pooled position")


def _rounded(needed: int, limit: int) -> int:
    return min(-(-needed // TRIM_MULTIPLE) * TRIM_MULTIPLE, limit)


@torch.compiler.disable  # data-dependent shapes: under torch.compile, a deliberate graph break
def text_length_groups(
    pooled_at: Tensor, limit: int, max_groups: int = MAX_GROUPS
) -> list[tuple[Tensor | None, int]]:
    """Rows of a text batch grouped by the columns they need: ``[(row indices, length)]``.

    ``pooled_at`` (B,) are the pooled positions, ``limit`` the columns available. Rows are
    sorted by need and cut into at most ``max_groups`` groups of at least ``MIN_GROUP_ROWS``;
    each group runs ``max(pooled position) + 1`` columns rounded up to ``TRIM_MULTIPLE``, and
    neighbours that round to the same length are merged. One group covering the whole batch is
    ``[(None, length)]``. Web captions are mostly short with a few 77-token ones in every large
    batch: one long row no longer makes the whole batch run the whole context.
    """
    rows = pooled_at.shape[0]
    if rows == 0:
        return [(None, _rounded(1, limit))]
    needed = pooled_at + 1  # (B,)
    if rows < 2 * MIN_GROUP_ROWS or max_groups == 1:
        return [(None, _rounded(int(needed.max()), limit))]
    order = torch.argsort(needed, stable=True)  # (B,) rows by need
    sorted_needed = needed[order].tolist()
    size = max(MIN_GROUP_ROWS, -(-rows // max_groups))
    cuts: list[list[int]] = []  # [start, end, length] over the sorted rows
    for start in range(0, rows, size):
        end = min(start + size, rows)
        length = _rounded(sorted_needed[end - 1], limit)
        if cuts and cuts[-1][2] == length:
            cuts[-1][1] = end
        elif end - start < MIN_GROUP_ROWS:  # a short remainder joins the previous group
            cuts[-1][1:] = [end, length]
        else:
            cuts.append([start, end, length])
    if len(cuts) == 1:
        return [(None, cuts[0][2])]
    return [(order[a:b], length) for a, b, length in cuts]


def text_positions_run(
    text: Tensor,
    pool_type: str,
    eos_id: int | None,
    context_length: int,
    max_groups: int = MAX_GROUPS,
) -> float:
    """Mean text positions per row that the pooled forward runs for the batch ``text`` (B, L)."""
    limit = min(text.shape[1], context_length)
    groups = text_length_groups(pooled_positions(text, pool_type, eos_id), limit, max_groups)
    if groups[0][0] is None:
        return float(groups[0][1])
    return sum(len(rows) * length for rows, length in groups) / text.shape[0]


class PooledResidualAttentionBlock(ResidualAttentionBlock):
    """open_clip's block; given ``pooled_at``, it computes only those positions' outputs."""

    def forward(
        self,
        q_x: Tensor,
        k_x: Tensor | None = None,
        v_x: Tensor | None = None,
        attn_mask: Tensor | None = None,
        pooled_at: Tensor | None = None,
    ) -> Tensor:
        if pooled_at is None:
            return super().forward(q_x, k_x, v_x, attn_mask=attn_mask)
        rows = torch.arange(q_x.shape[0], device=q_x.device)
        h = self.ln_1(q_x)  # (B, N, W): keys and values of every position
        q = h[rows, pooled_at].unsqueeze(1)  # (B, 1, W): the pooled positions' queries
        mask = None
        if attn_mask is not None:
            mask = attn_mask[pooled_at].unsqueeze(1).to(q.dtype)  # (B, 1, N): each query's row
            mask = mask.repeat_interleave(self.attn.num_heads, dim=0)  # (B * heads, 1, N)
        attended = self.attn(q, h, h, need_weights=False, attn_mask=mask)[0]  # (B, 1, W)
        x = q_x[rows, pooled_at].unsqueeze(1) + self.ls_1(attended)
        return x + self.ls_2(self.mlp(self.ln_2(x)))  # (B, 1, W)


def _run_blocks(
    transformer: Transformer, x: Tensor, attn_mask: Tensor | None, pooled_at: Tensor
) -> Tensor:
    """(B, N, W) -> (B, W): the blocks, the last one for the pooled positions only."""
    *blocks, last = transformer.resblocks
    for block in blocks:
        if transformer.grad_checkpointing:
            x = checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
        else:
            x = block(x, attn_mask=attn_mask)
    return last(x, attn_mask=attn_mask, pooled_at=pooled_at)[:, 0]


def _encode_rows(tower: OpenClipTower, text: Tensor, pooled_at: Tensor) -> Tensor:
    """(b, length) token ids, already cut to the columns they need -> (b, W) pooled."""
    length = text.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast_dtype)  # (b, length, W)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    mask = tower.attn_mask[:length, :length]
    return _run_blocks(tower.transformer, x, mask, pooled_at)


def _encode_text(tower: OpenClipTower, text: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """The causal text tower of ``tower`` (CLIP's own attributes, or a TextTransformer):
    (B, L) token ids -> (B, D) unnormalised features, computing only what they depend on."""
    if text.shape[0] == 0:  # nothing to attend over; the right (0, D) shape, dtype and device
        x = tower.ln_final(tower.token_embedding(text[:, 0]).to(tower.transformer.get_cast_dtype()))
    else:
        x = _encode_nonempty(tower, text, pool_type, eos_id)
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def _encode_nonempty(
    tower: OpenClipTower, text: Tensor, pool_type: str, eos_id: int | None
) -> Tensor:
    pooled_at = pooled_positions(text, pool_type, eos_id)  # (B,)
    limit = min(text.shape[1], tower.positional_embedding.shape[0])
    max_groups = getattr(tower, "max_length_groups", MAX_GROUPS)
    groups = text_length_groups(pooled_at, limit, max_groups)
    if groups[0][0] is None:
        x = _encode_rows(tower, text[:, : groups[0][1]], pooled_at)  # (B, W)
    else:
        parts = [
            _encode_rows(tower, text[rows, :length], pooled_at[rows]) for rows, length in groups
        ]
        order = torch.cat([rows for rows, _ in groups])  # (B,) batch row of each output row
        x = torch.cat(parts)[torch.argsort(order)]  # (B, W) back in batch order
    return tower.ln_final(x)  # (B, W)


class PooledTextCLIP(open_clip.CLIP):
    """open_clip's CLIP whose ``encode_text`` computes only what the text feature depends on."""

    def encode_text(self, text: Tensor, normalize: bool = False) -> Tensor:
        x = _encode_text(self, text, self.text_pool_type, getattr(self, "text_eos_id", None))
        return F.normalize(x, dim=-1) if normalize else x


class PooledTextTransformer(TextTransformer):
    """open_clip's TextTransformer (CustomTextCLIP's text tower), computing only what the
    pooled feature depends on."""

    def forward(self, text: Tensor) -> Tensor:
        return _encode_text(self, text, self.pool_type, getattr(self, "eos_id", None))


class PooledVisionTransformer(VisionTransformer):
    """open_clip's ViT with ``tok`` pooling whose last block computes the class token only."""

    def forward(self, x: Tensor) -> Tensor:
        x = self._embeds(x)  # (B, N, W), class token first
        class_token = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = _run_blocks(self.transformer, x, None, class_token)  # (B, W)
        pooled, _ = self._pool(x.unsqueeze(1))  # ln_post on the class token
        return pooled @ self.proj if self.proj is not None else pooled


def _plain_blocks(transformer: Any) -> bool:
    return (
        type(transformer) is Transformer
        and getattr(transformer, "batch_first", False)
        and len(transformer.resblocks) > 0
        and all(
            type(b) is ResidualAttentionBlock
            and type(b.attn) is nn.MultiheadAttention
            and not hasattr(b, "ln_1_kv")
            for b in transformer.resblocks
        )
    )


def _switch_last_block(transformer: Transformer) -> None:
    transformer.resblocks[-1].__class__ = PooledResidualAttentionBlock


def _causal_pooled(tower: OpenClipTower, pool_type: str) -> bool:
    return (
        isinstance(tower.attn_mask, Tensor)
        and pool_type in ("argmax", "eos")
        and _plain_blocks(tower.transformer)
        # an appended class token (embed_cls) makes the table longer than the context
        and tower.positional_embedding.shape[0] == tower.context_length
    )


def enable_pooled_forward(model: nn.Module) -> list[str]:
    """Switch ``model``'s towers to the pooled-only forward where that is exact; returns the
    towers switched (``"image"``, ``"text"``).

    ``model`` is an open_clip model as ``open_clip.create_model`` returns it (before any
    DDP/FSDP/compile wrapping).
    """
    switched = []
    visual: Any = getattr(model, "visual", None)
    if (
        type(visual) is VisionTransformer
        and visual.attn_pool is None
        and visual.pool_type == "tok"
        and not visual.output_tokens
        and _plain_blocks(visual.transformer)
    ):
        _switch_last_block(visual.transformer)
        visual.__class__ = PooledVisionTransformer
        switched.append("image")
    if type(model) is open_clip.CLIP:
        if _causal_pooled(model, cast(str, model.text_pool_type)):
            _switch_last_block(model.transformer)
            model.__class__ = PooledTextCLIP
            switched.append("text")
        return switched
    text: Any = getattr(model, "text", None)
    if (
        type(text) is TextTransformer
        and text.cls_emb is None
        and not text.output_tokens
        and not text.use_pad_mask
        and _causal_pooled(text, text.pool_type)
    ):
        _switch_last_block(text.transformer)
        text.__class__ = PooledTextTransformer
        switched.append("text")
    return switched


_POOLED_CLASSES = (
    PooledResidualAttentionBlock,
    PooledTextCLIP,
    PooledTextTransformer,
    PooledVisionTransformer,
)


def disable_pooled_forward(model: nn.Module) -> list[str]:
    """Undo :func:`enable_pooled_forward`: every switched module gets open_clip's own class (and
    forward) back; returns the towers restored (``"image"``, ``"text"``).

    For tracing and export: the pooled text forward groups rows by length on the host, which a
    traced graph would freeze at the example's lengths.
    """
    restored = []
    for module in model.modules():
        cls = type(module)
        if cls in _POOLED_CLASSES:
            module.__class__ = cls.__bases__[0]
            if cls is PooledVisionTransformer:
                restored.append("image")
            elif cls is not PooledResidualAttentionBlock:
                restored.append("text")
    return restored


def _pooled_text_tower(model: nn.Module) -> tuple[OpenClipTower, str, int | None] | None:
    """(tower, pool type, EOS id) of a switched text tower of the (unwrapped) model, else None."""
    if isinstance(model, PooledTextCLIP):
        return model, model.text_pool_type, getattr(model, "text_eos_id", None)
    tower = getattr(model, "text", None)
    if isinstance(tower, PooledTextTransformer):
        return tower, tower.pool_type, getattr(tower, "eos_id", None)
    return None


def set_max_length_groups(model: nn.Module, groups: int) -> None:
    """Cap the text length groups of the (unwrapped) model. FSDP needs 1: each block call
    all-gathers its parameters, so every rank must call each block equally often, and the
    number of groups depends on each rank's own captions."""
    found = _pooled_text_tower(model)
    if found is not None:
        found[0].max_length_groups = groups


@torch.no_grad()
def batch_text_positions(model: nn.Module, text: Tensor) -> float:
    """Mean text positions per row the (unwrapped) model runs for this batch (B, L)."""
    found = _pooled_text_tower(model)
    if found is None:
        return float(text.shape[1])
    tower, pool_type, eos_id = found
    groups = getattr(tower, "max_length_groups", MAX_GROUPS)
    return text_positions_run(text, pool_type, eos_id, text.shape[1], groups)


def full_context_tokens(model: nn.Module, rows: int, context_length: int) -> Tensor:
    """(rows, context_length) token ids whose pooled position is the last column for this
    (unwrapped) model's pooling: the whole context runs (for counting full-context FLOPs)."""
    found = _pooled_text_tower(model)
    pool_type, eos_id = (found[1], found[2]) if found is not None else ("argmax", None)
    if pool_type == "eos" and eos_id is not None:
        tokens = torch.full((rows, context_length), 1 if eos_id == 0 else 0, dtype=torch.long)
        tokens[:, -1] = eos_id
    else:
        tokens = torch.zeros(rows, context_length, dtype=torch.long)
        tokens[:, -1] = 1  # the highest id: argmax pools here
    return tokens
