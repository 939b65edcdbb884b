"""Training-time evaluation callbacks, registered under the ``clipforge.eval_callbacks`` entry
point group (pyproject.toml), so pretrain finds them by name without importing eval::

    CLIPFORGE_EVAL_DATA=val-shards/ clipforge-pretrain --config tiny \\
        --set train.eval_callback=retrieval --set train.eval_every=500 ...

pretrain calls ``callback(model, step)`` on every rank every ``train.eval_every`` steps and logs
the returned figures as ``eval/<name>`` in ``metrics.jsonl``. The callback's own settings come
from the environment (each ``CLIPFORGE_EVAL_*`` variable below), or from a small YAML/JSON file
named by ``CLIPFORGE_EVAL_CONFIG`` with the same keys in lower case (``data``, ``k``, ...);
variables override the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clipforge.pretrain.config import ConfigError
from clipforge.pretrain.distributed import DistInfo

ENV_PREFIX = "CLIPFORGE_EVAL_"


@dataclass(frozen=True)
class CallbackConfig:
    """Settings of the training-time retrieval callback."""

    data: str
    """SHARDS of the evaluation set (``CLIPFORGE_EVAL_DATA``; required)."""
    k: tuple[int, ...] = (1, 5, 10)
    """Recall@K values (``CLIPFORGE_EVAL_K``, e.g. ``1,5,10``)."""
    batch_size: int = 256
    """Embedding batch size (``CLIPFORGE_EVAL_BATCH_SIZE``)."""
    limit: int | None = None
    """At most this many samples per rank (``CLIPFORGE_EVAL_LIMIT``; quick checks)."""
    image_id_field: str | None = None
    """Group captions by this .json field (``CLIPFORGE_EVAL_IMAGE_ID_FIELD``)."""
    model_name: str | None = None
    """open_clip model name or config JSON whose tokenizer to use
    (``CLIPFORGE_EVAL_MODEL_NAME``); needed only for Hugging Face text towers -- otherwise
    open_clip's default tokenizer with the model's context length is used."""


def callback_config(environ: Mapping[str, str] | None = None) -> CallbackConfig:
    """The callback's settings from ``CLIPFORGE_EVAL_CONFIG`` (file) and ``CLIPFORGE_EVAL_*``."""
    from clipforge.eval.metrics import parse_ks

    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    cfg_file = env.get(ENV_PREFIX + "CONFIG")
    if cfg_file:
        values.update(_read_config_file(cfg_file))
    for f in dataclasses.fields(CallbackConfig):
        v = env.get(ENV_PREFIX + f.name.upper())
        if v not in (None, ""):
            values[f.name] = v
    unknown = set(values) - {f.name for f in dataclasses.fields(CallbackConfig)}
    if unknown:
        raise ConfigError(f"eval callback config: unknown keys {sorted(unknown)}")
    if not values.get("data"):
        raise ConfigError(
            "train.eval_callback=retrieval needs an evaluation set: set CLIPFORGE_EVAL_DATA=SHARDS "
            "(or CLIPFORGE_EVAL_CONFIG=file.yaml with 'data: SHARDS')"
        )
    try:
        if "k" in values:
            values["k"] = parse_ks(
                values["k"] if isinstance(values["k"], str) else list(values["k"])
            )
        for name in ("batch_size", "limit"):
            if values.get(name) is not None:
                values[name] = int(values[name])
                if values[name] < 1:
                    raise ValueError(f"{name} must be >= 1")
    except ValueError as e:
        raise ConfigError(f"eval callback config: {e}") from None
    values["data"] = str(values["data"])
    return CallbackConfig(**values)


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{ENV_PREFIX}CONFIG: {p} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            obj = json.loads(text)
        else:
            import yaml

            obj = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise different types; both mean "bad file"
        raise ConfigError(f"{p}: not valid {p.suffix.lstrip('.') or 'YAML'} ({e})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{p}: expected a mapping of settings")
    return obj


def _dist_info(model: nn.Module) -> DistInfo:
    """Where this rank sits, read from the running process group (pretrain set it up)."""
    device = next(model.parameters()).device
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistInfo(rank, world, device.index or 0, device, dist.get_backend())
    return DistInfo(0, 1, 0, device, None)


def _tokenizer(model: nn.Module, cfg: CallbackConfig) -> Any:
    if cfg.model_name:
        from clipforge.pretrain.models import load_tokenizer

        return load_tokenizer(cfg.model_name)
    text = getattr(model, "text", None)
    if text is not None and type(text).__name__ == "HFTextEncoder":
        raise ConfigError(
            "the model's text tower is a Hugging Face model: set CLIPFORGE_EVAL_MODEL_NAME to its "
            "open_clip model name / config so the eval callback uses the right tokenizer"
        )
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))


def _image_transforms(model: nn.Module) -> tuple[Any, Any]:
    from clipforge.data_tools.transforms import CLIP_MEAN, CLIP_STD, clip_image_transforms

    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = getattr(visual, "preprocess_cfg", {}) or {}
    return clip_image_transforms(
        int(size), train=False, mean=pre.get("mean", CLIP_MEAN), std=pre.get("std", CLIP_STD)
    )


def retrieval_callback(model: nn.Module, step: int) -> dict[str, float]:
    """Exact retrieval figures of ``model`` on ``CLIPFORGE_EVAL_DATA``: ``t2i_R@K``,
    ``i2t_R@K``, mean/median ranks. Called on every rank (each embeds its share of the data);
    every rank returns the same figures."""
    from clipforge.eval.data import EvalDataConfig, embed_eval_set
    from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval, flat_metrics

    cfg = callback_config()
    info = _dist_info(model)
    data_cfg = EvalDataConfig(
        batch_size=cfg.batch_size,
        workers=0,  # no worker processes forked from inside the training loop
        image_id_field=cfg.image_id_field,
        limit=cfg.limit,
    )
    with torch.no_grad():
        emb = embed_eval_set(
            model, _tokenizer(model, cfg), _image_transforms(model), cfg.data, data_cfg, info
        )
        metrics = evaluate_retrieval(emb, info, RetrievalConfig(ks=cfg.k))
    return flat_metrics(metrics)
