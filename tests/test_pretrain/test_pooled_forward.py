"""The pooled-only forward is exact: the same features and gradients as open_clip's own forward,
for fewer FLOPs; towers where it would not be exact are left alone."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import TextTransformer, VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from clipforge.pretrain.config import ModelConfig
from clipforge.pretrain.models import build_model, export_open_clip, load_model
from clipforge.pretrain.pooled_forward import (
    PooledResidualAttentionBlock,
    PooledTextCLIP,
    PooledTextTransformer,
    PooledVisionTransformer,
    batch_text_positions,
    enable_pooled_forward,
    full_context_tokens,
    pooled_positions,
    text_length_groups,
    text_positions_run,
)

CAPTIONS = [
    "cat",
    "grinning face with big eyes, awesome, happy, mouth",
    "flag: Japan",
    "man in business suit levitating, medium-dark skin tone, business, suit, levitate",
]

VISION_CFG = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}


def test_length_groups_hand_computed() -> None:
    eot = 49407
    text = torch.zeros(3, 32, dtype=torch.long)
    text[0, :4] = torch.tensor([49406, 5, 6, eot])  # pooled at 3
    text[1, :10] = torch.tensor([49406, *range(1, 9), eot])  # pooled at 9
    text[2, :2] = torch.tensor([49406, eot])  # pooled at 1
    # fewer than 2 x MIN_GROUP_ROWS rows: one group, max need 10 rounded up to 16
    assert text_length_groups(pooled_positions(text, "argmax", None), 32) == [(None, 16)]
    assert text_positions_run(text[[0, 2]], "argmax", None, 32) == 8
    assert text_positions_run(text, "argmax", None, 12) == 12  # capped at the context
    eos = torch.tensor([[1, 2, 7, 2, 0, 0], [1, 3, 3, 3, 3, 7]])
    assert text_positions_run(eos, "eos", 7, 6) == 6  # first EOS at 2 and 5
    assert text_positions_run(eos[:1], "eos", 7, 64) == 6  # rounded to 8, capped at L = 6
    with pytest.raises(ValueError, match="'last' has no single pooled position"):
        pooled_positions(text, "last", None)
    # 128 rows: 100 need 5 columns, 20 need 12, 8 need 70 (shuffled). Cut into 4 x 32 sorted
    # rows: the first three round to 8 and merge; the last holds the 8 long ones -> 72.
    needed = torch.tensor([5] * 100 + [12] * 20 + [70] * 8)
    pooled_at = (needed - 1)[torch.randperm(128, generator=torch.Generator().manual_seed(0))]
    groups = text_length_groups(pooled_at, 77)
    assert [(len(rows), length) for rows, length in groups] == [(96, 8), (32, 72)]
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(128))
    for rows, length in groups:
        assert int(pooled_at[rows].max()) < length
    # 96 x 8 + 32 x 72 positions instead of 128 x 72
    batch = torch.zeros(128, 77, dtype=torch.long)
    batch[torch.arange(128), pooled_at] = eot
    assert text_positions_run(batch, "argmax", None, 77) == (96 * 8 + 32 * 72) / 128


def _tokens(name: str) -> torch.Tensor:
    return open_clip.get_tokenizer(name)(CAPTIONS)  # (4, context)


def _features_and_grads(model: torch.nn.Module, encode, inputs: torch.Tensor) -> tuple:
    model.zero_grad(set_to_none=True)
    features = encode(inputs)  # (B, D)
    (features * torch.linspace(-1, 1, features.numel()).view_as(features)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return features.detach(), grads


def _assert_exact(model: torch.nn.Module, encode, reference, inputs: torch.Tensor) -> None:
    """float64 so that summation order (the only difference) stays far below the tolerance."""
    model.double()
    inputs = inputs.double() if inputs.is_floating_point() else inputs
    feats, grads = _features_and_grads(model, encode, inputs)
    ref_feats, ref_grads = _features_and_grads(model, reference, inputs)
    torch.testing.assert_close(feats, ref_feats, rtol=1e-10, atol=1e-12)
    assert grads.keys() == ref_grads.keys() and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-10, atol=1e-10)


def _flops(fn, inputs: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(inputs)
    return counter.get_total_flops()


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_clip_towers_are_exact_and_cheaper(grad_checkpointing: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(name="clipforge-tiny", grad_checkpointing=grad_checkpointing)
    model, _ = build_model(cfg)
    assert type(model) is PooledTextCLIP and type(model.visual) is PooledVisionTransformer
    assert type(model.transformer.resblocks[-1]) is PooledResidualAttentionBlock
    model.train()
    text = _tokens("clipforge-tiny")
    assert batch_text_positions(model, text) == 24  # longest caption: 21 tokens -> 24 of 32
    _assert_exact(model, model.encode_text, lambda t: open_clip.CLIP.encode_text(model, t), text)
    # a batch long enough to be split into length groups, one caption cut at the context
    varied = open_clip.get_tokenizer("clipforge-tiny")(
        [" ".join(["happy"] * (i % 40)) + " face" for i in range(80)]
    )  # (80, 32)
    assert batch_text_positions(model, varied) < 30
    _assert_exact(model, model.encode_text, lambda t: open_clip.CLIP.encode_text(model, t), varied)
    images = _images()
    _assert_exact(
        model, model.encode_image, lambda x: VisionTransformer.forward(model.visual, x), images
    )
    # fewer FLOPs: 8 text positions instead of 32 for short captions; the image tower's last
    # block (of 2) for the class token only
    short = text[[0, 2]]  # 3 and 6 tokens
    model.float()
    images = images.float()
    pooled_text, pooled_image = _flops(model.encode_text, short), _flops(model.encode_image, images)
    full_text = _flops(lambda t: open_clip.CLIP.encode_text(model, t), short)
    full_image = _flops(lambda x: VisionTransformer.forward(model.visual, x), images)
    assert full_text > 4 * pooled_text
    assert 1.3 * pooled_image < full_image < 2 * pooled_image


def test_custom_text_tower_is_exact(tmp_path: Path) -> None:
    cfg = {
        "embed_dim": 32,
        "custom_text": True,
        "vision_cfg": VISION_CFG,
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2},
    }
    path = tmp_path / "custom-tiny.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name=str(path)))
    assert type(model.text) is PooledTextTransformer
    text = _tokens("custom-tiny")  # registered under the file's stem
    _assert_exact(model, model.encode_text, lambda t: TextTransformer.forward(model.text, t), text)


def test_towers_it_would_not_be_exact_for_are_left_alone(tmp_path: Path) -> None:
    text_cfg = {
        "context_length": 32,
        "vocab_size": 49408,
        "width": 32,
        "heads": 2,
        "layers": 1,
        "no_causal_mask": True,  # bidirectional: every position reaches the pooled one
        "pool_type": "last",
    }
    vision_cfg = {**VISION_CFG, "pool_type": "avg"}  # every token reaches the feature
    for custom in (False, True):
        cfg = {
            "embed_dim": 32,
            "custom_text": custom,
            "vision_cfg": vision_cfg,
            "text_cfg": text_cfg,
        }
        path = tmp_path / f"bidir-{custom}.json"
        path.write_text(json.dumps(cfg))
        model, _ = build_model(ModelConfig(name=str(path)))
        assert type(model) in (open_clip.CLIP, open_clip.CustomTextCLIP)
        assert type(model.visual) is VisionTransformer
        assert type(getattr(model, "text", None)) is not PooledTextTransformer
        assert not any(isinstance(m, PooledResidualAttentionBlock) for m in model.modules())
        assert enable_pooled_forward(model) == []
        assert batch_text_positions(model, _tokens("clipforge-tiny")) == 32


def test_can_be_turned_off_and_leaves_weights_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain, _ = build_model(ModelConfig(name="clipforge-tiny", pooled_forward=False))
    assert type(plain) is open_clip.CLIP and type(plain.visual) is VisionTransformer
    torch.manual_seed(0)
    pooled, model_cfg = build_model(ModelConfig(name="clipforge-tiny"))
    assert list(pooled.state_dict()) == list(plain.state_dict())
    # exported weights load into plain open_clip and give the pooled model's features
    export_open_clip(pooled, model_cfg, tmp_path / "model")
    reference, _, _ = open_clip.create_model_and_transforms("local-dir:" + str(tmp_path / "model"))
    reference.eval()
    loaded = load_model(tmp_path / "model")
    assert type(loaded.model) is PooledTextCLIP
    text, images = loaded.tokenizer(CAPTIONS), _images()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_text(text), reference.encode_text(text), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            loaded.model.encode_image(images), reference.encode_image(images), rtol=1e-5, atol=1e-6
        )


def test_eos_pooling_is_exact_and_counted_over_the_whole_context(tmp_path: Path) -> None:
    text_cfg = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    cfg = {"embed_dim": 32, "vision_cfg": VISION_CFG}
    cfg["text_cfg"] = {**text_cfg, "pool_type": "eos", "eos_id": 49407}
    path = tmp_path / "eos-tiny.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name=str(path)))
    assert type(model) is PooledTextCLIP and model.text_pool_type == "eos"
    text = _tokens("eos-tiny")
    _assert_exact(model, model.encode_text, lambda t: open_clip.CLIP.encode_text(model, t), text)
    # the FLOP count's dummy batch runs the whole context for eos pooling too
    tokens = full_context_tokens(model, 2, 32)
    assert pooled_positions(tokens, "eos", 49407).tolist() == [31, 31]
    assert batch_text_positions(model, tokens) == 32


def test_empty_batch_and_appended_class_token(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig(name="clipforge-tiny"))
    with torch.no_grad():
        empty = model.encode_text(torch.zeros(0, 32, dtype=torch.long))
        assert empty.shape == open_clip.CLIP.encode_text(model, torch.zeros(0, 32).long()).shape
    # CLIP with embed_cls: open_clip's own encode_text cannot run it; neither is it switched
    text_cfg = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg = {"embed_dim": 32, "vision_cfg": VISION_CFG, "text_cfg": {**text_cfg, "embed_cls": True}}
    path = tmp_path / "cls-tiny.json"
    path.write_text(json.dumps(cfg))
    model, _ = build_model(ModelConfig(name=str(path)))
    assert type(model) is open_clip.CLIP and type(model.visual) is PooledVisionTransformer
