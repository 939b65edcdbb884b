"""Whole evaluations: load a model, read and embed the data, compute, and build the result object.

These are what the command line runs; they work in one process or under ``torchrun`` (every rank
calls them; each reads and embeds its part of the data; every rank gets the whole result, and the
caller writes it from rank 0 only).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from clipforge.eval.data import (
    EmbeddedSet,
    EvalDataConfig,
    EvalDataError,
    data_manifest,
    embed_eval_set,
    is_image_folder,
    label_field_of,
)
from clipforge.eval.report import make_report
from clipforge.eval.retrieval import (
    RetrievalConfig,
    evaluate_field_queries,
    evaluate_retrieval,
    field_query_direction,
    index_retrieval,
)
from clipforge.eval.zeroshot import (
    ZeroShotConfig,
    build_classifier,
    evaluate_zeroshot,
    load_classnames,
    load_templates,
)
from clipforge.pretrain.distributed import DistInfo, init_distributed
from clipforge.pretrain.models import LoadedModel, load_model


def setup(device: str = "auto") -> DistInfo:
    """This process's place in the job (initialises the process group under torchrun)."""
    return init_distributed(device)


def _model_info(loaded: LoadedModel, model_name: str | None) -> dict[str, Any]:
    return {"source": loaded.source, "hash": loaded.model_hash, "name": model_name}


def run_retrieval(
    model: str | LoadedModel,
    data: str,
    info: DistInfo,
    data_cfg: EvalDataConfig | None = None,
    cfg: RetrievalConfig | None = None,
    model_name: str | None = None,
    index_dir: str | None = None,
    command: list[str] | None = None,
    query_fields: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Retrieval figures of ``model`` on ``data`` (exact, and through ``index_dir`` if given);
    each of ``query_fields`` (a .json field such as ``name``) adds an exact text -> image
    direction queried by that field of every image (``metrics["exact"]["name_to_image"]``)."""
    data_cfg = data_cfg or EvalDataConfig()
    cfg = cfg or RetrievalConfig()
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, info.device, model_name)
    loaded.model.to(info.device)
    emb = embed_eval_set(
        loaded.model, loaded.tokenizer, loaded.image_transforms(), data, data_cfg, info
    )
    exact: dict[str, Any] = dict(evaluate_retrieval(emb, info, cfg))
    for query_field in query_fields:
        exact[field_query_direction(query_field)] = evaluate_field_queries(
            emb,
            loaded.model,
            loaded.tokenizer,
            query_field,
            info,
            cfg,
            data_cfg.batch_size,
            data_cfg.precision,
        )
    metrics: dict[str, Any] = {"exact": exact}
    if index_dir is not None:
        metrics["index"] = index_retrieval(emb, index_dir, cfg.ks, loaded.model_hash)
        metrics["index"]["dir"] = str(index_dir)
    manifest = data_manifest(data)
    manifest.update(
        samples=emb.samples,
        images=int(emb.image_emb.shape[0]),
        texts=len(emb.captions),
        skipped=emb.skipped,
    )
    return make_report(
        "retrieval",
        metrics,
        _model_info(loaded, model_name),
        manifest,
        {
            "data": dataclasses.asdict(data_cfg),
            "retrieval": dataclasses.asdict(cfg),
            "query_fields": list(query_fields),
            "world_size": info.world_size,
        },
        command,
        time.perf_counter() - t0,
    )


def _check_labels(data: str, emb: EmbeddedSet, field: str) -> None:
    """Zero-shot needs every image's class: say which field is missing and how to fill it."""
    missing = [k for k, lab in zip(emb.image_keys, emb.labels, strict=True) if lab is None]
    if not missing:
        return
    if is_image_folder(data):
        raise EvalDataError(
            f"{data}: {len(missing)} of {len(emb.labels)} images have no class: put each "
            f"image in a sub-folder named after its class (e.g. {data}/cats/{missing[0]})"
        )
    which = (
        "no sample has"
        if len(missing) == len(emb.labels)
        else (f"{len(missing)} of {len(emb.labels)} samples (e.g. {missing[0]}) have")
    )
    raise EvalDataError(
        f"{data}: {which} a class label in the field {field!r} of its .json; zero-shot needs "
        f"one per sample: write the shards from class sub-folders with `clipforge-data write "
        f'FOLDER SHARDS --label-from-folder` (stores "category"), or name the field that '
        f"holds it with --label-field (--classnames FILE sets the class names and their order, "
        f"but the labels must be in the data)"
    )


def run_zeroshot(
    model: str | LoadedModel,
    data: str,
    classnames: str | list[str] | None,
    info: DistInfo,
    templates: str | None = None,
    data_cfg: EvalDataConfig | None = None,
    cfg: ZeroShotConfig | None = None,
    model_name: str | None = None,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Zero-shot classification figures of ``model`` on ``data``. ``classnames`` None: the
    sorted distinct labels found in the data."""
    data_cfg = data_cfg or EvalDataConfig()
    cfg = cfg or ZeroShotConfig()
    t0 = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, info.device, model_name)
    loaded.model.to(info.device)
    tmpl = load_templates(templates)
    names = load_classnames(classnames) if classnames is not None else None
    emb = embed_eval_set(
        loaded.model, loaded.tokenizer, loaded.image_transforms(), data, data_cfg, info, texts=False
    )
    _check_labels(data, emb, label_field_of(data, data_cfg))
    if names is None:
        names = sorted({str(x) for x in emb.labels if x is not None})
    with torch.no_grad():
        classifier = build_classifier(loaded.model, loaded.tokenizer, names, tmpl, info.device, cfg)
    metrics = evaluate_zeroshot(emb, classifier, names, cfg)
    manifest = data_manifest(data)
    manifest.update(samples=emb.samples, skipped=emb.skipped)
    return make_report(
        "zeroshot",
        metrics,
        _model_info(loaded, model_name),
        manifest,
        {
            "data": dataclasses.asdict(data_cfg),
            "zeroshot": dataclasses.asdict(cfg),
            "classnames": names,
            "templates": str(Path(templates)) if templates else "imagenet (shipped)",
            "num_templates": len(tmpl),
            "world_size": info.world_size,
        },
        command,
        time.perf_counter() - t0,
    )
