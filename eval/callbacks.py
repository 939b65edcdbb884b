"""Training-time evaluation callbacks, registered under the ``clipforge.eval_callbacks`` entry
point group (pyproject.toml), so pretrain finds them by name without importing eval.

The evaluation is configured in the run config, saved in ``RUN/config.yaml`` with the rest::

    clipforge-pretrain --config tiny --set data.train=demo-data \\
        --set train.eval_callback=retrieval --set train.eval_every=100 \\
        --set train.eval.val.data=val-shards/ --set train.eval.val.limit=512 \\
        --set train.eval.test.data=test-shards/ --set train.eval.test.k=1,10

An entry point is a factory: pretrain calls ``factory(config)`` once on every rank before the
first step (so a wrong set fails before training, not at the first evaluation), then
``callback(model, step)`` every ``train.eval_every`` steps, and logs the returned figures as
``eval/<key>`` in ``metrics.jsonl``. :func:`retrieval_callback` returns each set's figures
under ``<set name>/`` (``eval/val/t2i_R@1``, ``eval/test/i2t_R@10``, ...).

The older way, ``CLIPFORGE_EVAL_*`` environment variables (or a YAML/JSON file named by
``CLIPFORGE_EVAL_CONFIG``; variables override the file), still works for a run whose
``train.eval`` is empty: it is one unnamed set, logged under the old keys (``eval/t2i_R@1``).
Beside ``train.eval`` sets those variables are refused, so that ``config.yaml`` always says what
was evaluated.
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

from clipforge.pretrain.config import Config, ConfigError, EvalSetConfig
from clipforge.pretrain.distributed import DistInfo

ENV_PREFIX = "CLIPFORGE_EVAL_"


@dataclass(frozen=True)
class CallbackConfig:
    """Settings of the retrieval callback from the environment (the older way; see the module
    docstring)."""

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
    (``CLIPFORGE_EVAL_MODEL_NAME``); None: the run's ``model.name``, as training tokenizes."""


def environment_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``CLIPFORGE_EVAL_*`` variables that are set (non-empty)."""
    env = os.environ if environ is None else environ
    return sorted(k for k, v in env.items() if k.startswith(ENV_PREFIX) and v)


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
            "train.eval_callback=retrieval needs an evaluation set: list it in the run config "
            "(--set train.eval.NAME.data=SHARDS, or train.eval in the YAML); the older "
            "CLIPFORGE_EVAL_DATA=SHARDS variable works too for a single unnamed set"
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


def _image_transforms(model: nn.Module) -> tuple[Any, Any]:
    from clipforge.data_tools.transforms import CLIP_MEAN, CLIP_STD, clip_image_transforms

    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = size[0] if isinstance(size, (tuple, list)) else size
    pre = getattr(visual, "preprocess_cfg", {}) or {}
    return clip_image_transforms(
        int(size), train=False, mean=pre.get("mean", CLIP_MEAN), std=pre.get("std", CLIP_STD)
    )


def retrieval_callback(config: Config) -> RetrievalCallback:
    """The ``retrieval`` entry point: the callback that evaluates each ``train.eval`` set of
    ``config`` (or the set of the ``CLIPFORGE_EVAL_*`` variables when it lists none). Checks
    every set's data now, so that a wrong path fails before the first training step."""
    from clipforge.data_tools.reader import ShardSpecError, parse_shard_spec
    from clipforge.pretrain.models import load_tokenizer

    env_vars = environment_settings()
    if config.train.eval:
        if env_vars:
            raise ConfigError(
                f"train.eval lists evaluation sets and {', '.join(env_vars)} is set too: the run "
                "config alone says what is evaluated (so that config.yaml records it); unset "
                "the variable(s) or drop train.eval"
            )
        sets, named, tokenizer_name = config.train.eval, True, config.model.name
    else:
        legacy = callback_config()
        # One unnamed set: its figures keep the older keys (eval/t2i_R@1, ...).
        sets = (
            EvalSetConfig(
                name="environment",
                data=legacy.data,
                k=legacy.k,
                limit=legacy.limit,
                batch_size=legacy.batch_size,
                image_id_field=legacy.image_id_field,
            ),
        )
        named, tokenizer_name = False, legacy.model_name or config.model.name
    for s in sets:
        try:
            parse_shard_spec(s.data)
        except ShardSpecError as e:
            where = f"train.eval.{s.name}.data" if named else f"{ENV_PREFIX}DATA"
            raise ConfigError(f"{where}: {e}") from None
    # The tokenizer training uses, so that evaluated captions are tokenized the same way.
    return RetrievalCallback(sets, load_tokenizer(tokenizer_name), named)


class RetrievalCallback:
    """``callback(model, step)``: exact retrieval figures of ``model`` on each evaluation set
    (``t2i_R@K``, ``i2t_R@K``, mean/median ranks), as ``<set>/<figure>`` keys (bare figure
    keys for the unnamed environment set). Called on every rank (each embeds its share of the
    data); every rank returns the same figures."""

    def __init__(self, sets: tuple[EvalSetConfig, ...], tokenizer: Any, named: bool) -> None:
        self.sets = sets
        """The evaluation sets, in the config's order."""
        self.tokenizer = tokenizer
        """The model's tokenizer (open_clip's, as training loads it)."""
        self.named = named
        """Prefix each figure with its set's name (False only for the environment's set)."""

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        from clipforge.eval.data import EvalDataConfig, embed_eval_set
        from clipforge.eval.retrieval import RetrievalConfig, evaluate_retrieval, flat_metrics

        info = _dist_info(model)
        transforms = _image_transforms(model)
        out: dict[str, float] = {}
        for s in self.sets:
            data_cfg = EvalDataConfig(
                batch_size=s.batch_size,
                workers=0,  # no worker processes forked from inside the training loop
                image_id_field=s.image_id_field,
                limit=s.limit,
            )
            with torch.no_grad():
                emb = embed_eval_set(model, self.tokenizer, transforms, s.data, data_cfg, info)
                metrics = evaluate_retrieval(emb, info, RetrievalConfig(ks=s.k))
            prefix = f"{s.name}/" if self.named else ""
            out.update({prefix + k: v for k, v in flat_metrics(metrics).items()})
        return out
