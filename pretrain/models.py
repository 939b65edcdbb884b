"""Model construction with open_clip, local weight loading, tower locking, and the public
"load a trained model for inference" API used by index and eval.

No function here touches the network: open_clip is only ever asked for random init, and weights
come from local files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import open_clip
import torch
from torch import nn

from clipforge.pretrain.config import ConfigError, ModelConfig
from clipforge.pretrain.pooled_forward import enable_pooled_forward

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
OPEN_CLIP_CONFIG_NAME = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_NAME = "open_clip_pytorch_model.bin"

_registered = False


def register_model_configs() -> None:
    """Make clipforge's shipped model configs (clipforge-tiny, clipforge-demo, bench-tiny)
    known to open_clip by name."""
    global _registered
    if not _registered:
        for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
            open_clip.add_model_config(path)
        _registered = True


def resolve_model_config(name: str) -> tuple[str, dict[str, Any]]:
    """(model name for open_clip, its model config dict) for a name or a JSON file path."""
    register_model_configs()
    path = Path(name)
    if name.endswith(".json"):
        if not path.is_file():
            raise ConfigError(f"model.name: model-config file {name} does not exist")
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"model.name: {name} is not valid JSON ({e})") from None
        cfg = cfg.get("model_cfg", cfg)
        if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
            raise ConfigError(f"model.name: {name} lacks embed_dim/vision_cfg/text_cfg")
        model_name = path.stem
        open_clip.factory._MODEL_CONFIGS[model_name] = cfg  # register under its file stem
        return model_name, cfg
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:8])
        raise ConfigError(
            f"model.name: unknown model {name!r} (open_clip knows e.g. {known}, ...; "
            f"or give a model-config .json file)"
        )
    return name, cfg


def load_tokenizer(name: str) -> Any:
    """open_clip's tokenizer for a model name or config JSON (local files only)."""
    model_name, model_cfg = resolve_model_config(name)
    try:
        return open_clip.get_tokenizer(model_name)
    except Exception as e:  # an HF tokenizer that is not in the local cache
        hf_name = model_cfg.get("text_cfg", {}).get("hf_tokenizer_name", "?")
        raise ConfigError(
            f"model {name!r} uses the Hugging Face tokenizer {hf_name!r}, which is not available "
            f"locally ({type(e).__name__}); clipforge never downloads at run time"
        ) from None


def build_model(
    cfg: ModelConfig,
    siglip: bool = False,
    init_logit_scale: float | None = None,
    init_logit_bias: float | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A randomly initialised (or locally initialised) open_clip model and its model config."""
    model_name, model_cfg = resolve_model_config(cfg.name)
    kwargs: dict[str, Any] = {}
    if siglip:
        kwargs["init_logit_bias"] = init_logit_bias if init_logit_bias is not None else -10.0
    with _quiet_open_clip():
        model = open_clip.create_model(model_name, pretrained=None, output_dict=True, **kwargs)
    if cfg.pooled_forward:
        log.info("pooled-only forward for: %s", ", ".join(enable_pooled_forward(model)) or "none")
    if init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(init_logit_scale)
    if cfg.init_checkpoint:
        _load_weights(model, cfg.init_checkpoint, prefix_filter=None)
    if cfg.init_image_checkpoint:
        _load_weights(model, cfg.init_image_checkpoint, prefix_filter="visual.")
    if cfg.init_text_checkpoint:
        _load_weights(model, cfg.init_text_checkpoint, prefix_filter="text")
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model, model_cfg


class _quiet_open_clip:
    """open_clip logs a WARNING for every model built without pretrained weights: by design here."""

    def __enter__(self) -> None:
        self._level = logging.root.level
        logging.root.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        logging.root.setLevel(self._level)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Model weights from an open_clip state dict file, a clipforge step checkpoint, or a
    clipforge ``model/`` folder / run directory."""
    p = Path(path)
    sharded = _sharded_step_checkpoint(p)
    if sharded is not None:
        return sharded.read_whole(p, keys={"model"})["model"]
    if p.is_dir():
        candidates = [p / OPEN_CLIP_WEIGHTS_NAME, p / "model" / OPEN_CLIP_WEIGHTS_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{p}: no {OPEN_CLIP_WEIGHTS_NAME} in it or in its model/")
        p = found
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{p}: not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # clipforge step checkpoint
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]  # open_clip_train checkpoint
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{p}: holds no state dict")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}


def _sharded_step_checkpoint(path: Path) -> Any:
    """The sharded-checkpoint module when ``path`` is a sharded step checkpoint (a directory
    with its sidecar), else None (imported only then: it reads with torch.distributed's DCP)."""
    if not path.is_dir():
        return None
    from clipforge.pretrain import sharded_checkpoint

    return sharded_checkpoint if (path / sharded_checkpoint.SIDECAR_NAME).is_file() else None


def _load_weights(model: nn.Module, path: str, prefix_filter: str | None) -> None:
    state = read_state_dict(path)
    if prefix_filter == "visual.":
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    elif prefix_filter == "text":
        state = {
            k: v
            for k, v in state.items()
            if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")
        }
    own = model.state_dict()
    mismatched = [
        f"{k}: {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(f"{path}: weights do not fit the model: {mismatched[:5]}")
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{path}: keys the model does not have: {unexpected[:5]}")
    missing = model.load_state_dict(state, strict=False).missing_keys
    if prefix_filter is None and missing:
        raise ValueError(f"{path}: weights miss model keys: {missing[:5]}")
    log.info("initialised %s from %s (%d tensors)", prefix_filter or "model", path, len(state))


def weights_hash(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) over the model's parameters and buffers, name by name.

    Identifies "the model that produced these embeddings" for index and eval.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def export_open_clip(
    model: nn.Module | None,
    model_cfg: dict[str, Any],
    out_dir: str | os.PathLike[str],
    preprocess_cfg: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``open_clip_config.json`` + ``open_clip_pytorch_model.bin`` (atomically) so that
    ``open_clip.create_model_and_transforms("local-dir:OUT")`` loads the model. ``state``: the
    whole weights when ``model``'s own are sharded (FSDP); with ``state`` and ``preprocess_cfg``
    (a checkpoint's), ``model`` may be None."""
    from clipforge.data_tools.atomic import atomic_output, write_json_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        if model is None:
            raise ValueError("export_open_clip: give the model or its state")
        state = model.state_dict()
    state = {k: v.detach().to("cpu") for k, v in state.items()}
    with atomic_output(out / OPEN_CLIP_WEIGHTS_NAME) as tmp:
        torch.save(state, tmp)
    visual = getattr(model, "visual", None)
    pre = dict(preprocess_cfg or getattr(visual, "preprocess_cfg", {}) or {})
    pre = {k: list(v) if isinstance(v, tuple) else v for k, v in pre.items()}
    write_json_atomic(out / OPEN_CLIP_CONFIG_NAME, {"model_cfg": model_cfg, "preprocess_cfg": pre})
    return out


class DualEncoder(Protocol):
    """What inference asks of an open_clip model: its two encoders, (B, ...) -> (B, D)."""

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor: ...


def dual_encoder(model: object) -> DualEncoder:
    """MODEL seen through its encoders. open_clip's classes carry no annotations, and
    ``nn.Module``'s typing reads any attribute as ``Tensor | Module``: this names the contract."""
    return cast(DualEncoder, model)


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to feed it."""

    model: nn.Module
    """The open_clip model in eval mode (``encode_image`` / ``encode_text``)."""
    tokenizer: Any
    """Callable: list of strings -> (B, context_length) token ids."""
    image_size: int
    """Input side in pixels."""
    mean: tuple[float, ...]
    """Normalisation mean."""
    std: tuple[float, ...]
    """Normalisation std."""
    model_hash: str
    """:func:`weights_hash` of the weights."""
    source: str
    """Where the weights came from."""

    def image_transforms(self) -> tuple[Any, Any]:
        """(per-sample, per-batch) eval transforms, as data_tools' reader takes them."""
        from clipforge.data_tools.transforms import clip_image_transforms

        return clip_image_transforms(self.image_size, train=False, mean=self.mean, std=self.std)


def load_model(
    path: str | os.PathLike[str], device: str | torch.device = "cpu", model_name: str | None = None
) -> LoadedModel:
    """Load a trained model for inference.

    ``path`` is a clipforge run directory (its ``model/``, else its newest step checkpoint), a
    ``model/`` folder, a clipforge step checkpoint (either form), or -- with ``model_name`` (an
    open_clip name or config JSON) -- a plain open_clip weights file.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model {p} does not exist")
    config_file = next(
        (
            c
            for c in (p / OPEN_CLIP_CONFIG_NAME, p / "model" / OPEN_CLIP_CONFIG_NAME)
            if p.is_dir() and c.is_file()
        ),
        None,
    )
    weights: str | Path = p
    if config_file is not None:
        blob = json.loads(config_file.read_text(encoding="utf-8"))
        model_cfg, pre = blob["model_cfg"], blob.get("preprocess_cfg", {})
        weights = config_file.parent / OPEN_CLIP_WEIGHTS_NAME
    elif p.is_dir() and (p / "checkpoints").is_dir():
        from clipforge.pretrain.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(p / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"{p}: a run directory with no model/ and no checkpoints")
        weights = ckpt
        model_cfg, pre = _config_from_checkpoint(ckpt, model_name)
    elif (p.is_file() or _sharded_step_checkpoint(p) is not None) and model_name is None:
        model_cfg, pre = _config_from_checkpoint(p, None)
    elif model_name is not None:
        _, model_cfg = resolve_model_config(model_name)
        pre = {}
    else:
        raise FileNotFoundError(f"{p}: no {OPEN_CLIP_CONFIG_NAME}, checkpoints/ or weights file")
    state = read_state_dict(weights)
    register_model_configs()
    name = "clipforge-loaded"
    open_clip.factory._MODEL_CONFIGS[name] = model_cfg
    kwargs = {"init_logit_bias": 0.0} if "logit_bias" in state else {}
    with _quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None, output_dict=True, **kwargs)
    model.load_state_dict(state, strict=True)
    enable_pooled_forward(model)
    model.eval().to(device)
    vision = model_cfg["vision_cfg"]
    size = pre.get("size", vision.get("image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    visual_pre = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pre.get("mean", visual_pre.get("mean", open_clip.OPENAI_DATASET_MEAN)))
    std = tuple(pre.get("std", visual_pre.get("std", open_clip.OPENAI_DATASET_STD)))
    tokenizer = load_tokenizer(name)
    return LoadedModel(model, tokenizer, int(size), mean, std, weights_hash(model), str(weights))


def _config_from_checkpoint(path: Path, model_name: str | None) -> tuple[dict, dict]:
    if model_name is not None:
        return resolve_model_config(model_name)[1], {}
    sharded = _sharded_step_checkpoint(path)
    if sharded is not None:
        obj = sharded.read_sidecar(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(obj, dict) and "model_cfg" in obj):
        raise ValueError(f"{path}: a bare weights file; say which model it is (model_name=...)")
    return obj["model_cfg"], obj.get("preprocess_cfg", {})
