"""Zero-shot classification: class names x prompt templates -> a text classifier over images.

The classifier of a class is the mean of its L2-normalised template embeddings, renormalised
(CLIP's and CLIP_benchmark's recipe); an image is scored against every class by cosine
similarity. Labels come from a field of each sample's .json (``category`` by default) or from the
class sub-folder of an image folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.eval.data import EmbeddedSet, EvalDataError, precision_autocast
from clipforge.eval.metrics import classification_metrics
from clipforge.pretrain.models import dual_encoder

TEMPLATES_DIR = Path(__file__).with_name("templates")
DEFAULT_TEMPLATES = TEMPLATES_DIR / "imagenet.txt"
"""OpenAI CLIP's 80 ImageNet prompt templates (as CLIP_benchmark ships them), ``{c}`` = class."""


@dataclass(frozen=True)
class ZeroShotConfig:
    """How zero-shot classification is scored."""

    ks: tuple[int, ...] = (1, 5)
    """Top-K accuracies reported."""
    batch_size: int = 256
    """Prompts per text-embedding batch."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (autocast) for the text tower."""


def load_classnames(spec: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Class names from a file (one per line), a comma-separated string, or a list."""
    if not isinstance(spec, (str, os.PathLike)):
        names = [str(s).strip() for s in spec]
    else:
        path = Path(spec)
        if path.is_file():
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        elif "," in str(spec):
            names = [s.strip() for s in str(spec).split(",")]
        else:
            raise EvalDataError(
                f"class names: {spec} is not a file (give a file with one name per line, or a "
                f"comma-separated list)"
            )
    names = [n for n in names if n]
    if not names:
        raise EvalDataError("class names: the list is empty")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise EvalDataError(f"class names: duplicated {dupes[:5]}")
    return names


def load_templates(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Prompt templates, one per line with ``{c}`` (or ``{}``) where the class name goes; the
    shipped ImageNet templates by default."""
    p = Path(path) if path is not None else DEFAULT_TEMPLATES
    if not p.is_file():
        raise EvalDataError(f"templates file {p} does not exist")
    lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    out = []
    for ln in lines:
        t = ln.replace("{}", "{c}")
        if "{c}" not in t:
            raise EvalDataError(f"{p}: template {ln!r} has no {{c}} placeholder for the class")
        out.append(t)
    if not out:
        raise EvalDataError(f"{p}: no templates")
    return out


def build_classifier(
    model: nn.Module,
    tokenizer: Any,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device,
    cfg: ZeroShotConfig = ZeroShotConfig(),
) -> torch.Tensor:
    """(C, D) float32: per class, the mean of its normalised template embeddings, renormalised."""
    prompts = [t.replace("{c}", c) for c in classnames for t in templates]
    out = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), cfg.batch_size):
            tokens = tokenizer(prompts[i : i + cfg.batch_size]).to(device)  # (B, context)
            with torch.no_grad(), precision_autocast(device, cfg.precision):
                features = dual_encoder(model).encode_text(tokens)  # (B, D)
                out.append(F.normalize(features.float(), dim=-1).cpu())  # (B, D) unit rows
    finally:
        model.train(was_training)
    emb = torch.cat(out).view(len(classnames), len(templates), -1)  # (C, T, D) unit rows
    return F.normalize(emb.mean(dim=1), dim=-1)  # (C, D)


def label_indices(labels: Sequence[Any], classnames: Sequence[str]) -> torch.Tensor:
    """(N,) class index of every label: a class name, or an integer index into ``classnames``.
    Labels that are neither fail with the first few named."""
    index = {c: i for i, c in enumerate(classnames)}
    out: list[int] = []
    unknown: list[Any] = []
    for lab in labels:
        if isinstance(lab, bool) or lab is None:
            unknown.append(lab)
        elif isinstance(lab, int):
            if 0 <= lab < len(classnames):
                out.append(lab)
            else:
                unknown.append(lab)
        elif str(lab) in index:
            out.append(index[str(lab)])
        else:
            unknown.append(lab)
    if unknown:
        missing = sorted({repr(u) for u in unknown})
        raise EvalDataError(
            f"{len(unknown)} sample(s) have labels not among the {len(classnames)} class names "
            f"(e.g. {', '.join(missing[:5])}); check --label-field and --classnames"
        )
    return torch.tensor(out, dtype=torch.long)


def evaluate_zeroshot(
    emb: EmbeddedSet,
    classifier: torch.Tensor,
    classnames: Sequence[str],
    cfg: ZeroShotConfig = ZeroShotConfig(),
) -> dict[str, float]:
    """acc@K, mean per-class recall, and the counts, for images with labels."""
    targets = label_indices(emb.labels, classnames)  # (N,)
    logits = emb.image_emb @ classifier.T  # (N, C) cosine similarities
    m = classification_metrics(logits, targets, cfg.ks)
    m["classes"] = float(len(classnames))
    m["classes_present"] = float(len(torch.unique(targets)))
    return m
