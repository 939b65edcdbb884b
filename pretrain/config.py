"""Typed, frozen, validated training configuration with named presets.

A run is configured by a preset name or a YAML file (``--config``) plus ``--set section.key=value``
overrides. Unknown sections/keys and values of the wrong type or out of range fail with an error
that names them. The resolved config is saved as ``config.yaml`` in the run directory.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value, key or file is wrong (the message names it)."""


@dataclass(frozen=True)
class ModelConfig:
    """Which dual encoder to train and how."""

    name: str = "clipforge-tiny"
    """open_clip model name (ViT-B-32, ViT-B-16, ViT-B-16-SigLIP, ...) or a model-config JSON."""
    init_checkpoint: str | None = None
    """Local weights for the whole model: an open_clip state dict, a clipforge step checkpoint or
    a clipforge run's ``model/`` folder. Nothing is ever downloaded."""
    init_image_checkpoint: str | None = None
    """Local weights for the image tower only (keys under ``visual.``)."""
    init_text_checkpoint: str | None = None
    """Local weights for the text tower only (every key not under ``visual.``)."""
    lock_image: bool = False
    """Freeze the image tower (LiT)."""
    lock_image_unlocked_groups: int = 0
    """With ``lock_image``: leave the last N layer groups of the image tower trainable."""
    lock_text: bool = False
    """Freeze the text tower."""
    lock_text_unlocked_layers: int = 0
    """With ``lock_text``: leave the last N layers of the text tower trainable."""
    grad_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    compile: bool = False
    """Wrap the model with ``torch.compile``."""
    fsdp: bool = False
    """Shard parameters across ranks (FSDP2 ``fully_shard``) for towers that do not fit one GPU."""
    pooled_forward: bool = True
    """Compute only what the pooled features depend on: the text tower stops at each caption's
    pooled token (captions grouped by length) and the last block runs the pooled position only
    (exact: same features and gradients up to float rounding; see
    ``clipforge.pretrain.pooled_forward``)."""

    def __post_init__(self) -> None:
        _check(
            self.lock_image_unlocked_groups >= 0,
            "model.lock_image_unlocked_groups",
            ">= 0",
            self.lock_image_unlocked_groups,
        )
        _check(
            self.lock_text_unlocked_layers >= 0,
            "model.lock_text_unlocked_layers",
            ">= 0",
            self.lock_text_unlocked_layers,
        )


@dataclass(frozen=True)
class DataConfig:
    """What to read and how."""

    train: str = ""
    """SHARDS: folder, brace pattern, glob; several joined with ``::`` and weighted with ``@W``."""
    batch_size: int = 32
    """Samples per rank per optimizer step (global batch = batch_size x world size)."""
    workers: int = 1
    """Data-loader worker processes per rank."""
    shuffle_buffer: int = 1000
    """Shuffle buffer in samples (0: shard order)."""
    resampled: bool = True
    """Draw shards with replacement (endless; epochs independent of shard count) instead of
    exact passes over the shards."""
    augment: bool = True
    """Random-resized-crop as open_clip's training transform (False: resize + centre crop).
    The colour jitter, grayscale and blur below apply either way."""
    crop_scale_min: float = 0.9
    """Smallest area fraction the random-resized-crop keeps (open_clip's 0.9; lower crops
    harder, e.g. 0.5; only with ``augment``)."""
    color_jitter: float = 0.0
    """Colour-jitter strength s (0: off): brightness, contrast, saturation factors in
    [1 - s, 1 + s], hue shift in [-s/4, s/4], on 80 % of samples (``StyleAugment``)."""
    grayscale: float = 0.0
    """Probability of a grayscale training image."""
    blur: float = 0.0
    """Probability of a Gaussian blur of a training image (sigma 0.1–2.0 px per 64 px)."""
    caption_subsets: float = 0.0
    """Probability of replacing a tag-list caption ("name, tag, tag") by a random subset of its
    comma-separated parts, so that short queries are in distribution (0: captions as written)."""
    caption_name_only: float = 0.0
    """Probability of replacing a tag-list caption by its name alone ("cat face"): the query a
    user types most, which subsets show in only ~1/n^2 of their draws (``caption_subsets +
    caption_name_only`` <= 1; the rest of the captions stay as written)."""
    caption_name_field: str = ""
    """Field of each sample's .json holding the name its caption starts with (the demo's
    ``name``): such a name stays one part when it holds commas ("kiss: woman, man"). "": the
    caption's first comma-separated part is the name."""
    allow_global_batch_change: bool = False
    """On resume: take ``data.batch_size`` literally as the per-rank batch, so the global batch
    becomes batch_size x the new world size (nothing else is scaled: not the learning rate, not
    the schedule). Unset, a resume keeps the checkpoint's global batch: on another world size
    each rank's batch becomes global / world size (refused when that does not divide)."""

    hard_negatives: str = ""
    """A hard-negatives file (``clipforge-index mine EMB_DIR --out FILE``, EMB_DIR embedded from
    these shards): each sample's mined captions join its image's row of the InfoNCE loss as
    extra negatives (SigLIP: extra pairs labelled negative). Samples the file lacks train
    without; metrics.jsonl counts them (``samples_without_hard_negatives``). "": none."""
    hard_negatives_per_sample: int = 1
    """With ``hard_negatives``: use each sample's first (most similar) N mined negatives; each
    costs one more caption through the text tower per sample."""

    def __post_init__(self) -> None:
        _check(
            self.hard_negatives_per_sample >= 1,
            "data.hard_negatives_per_sample",
            ">= 1",
            self.hard_negatives_per_sample,
        )
        subsets = self.caption_subsets
        _check(0 <= subsets <= 1, "data.caption_subsets", "in [0, 1]", subsets)
        name_only = self.caption_name_only
        _check(0 <= name_only <= 1, "data.caption_name_only", "in [0, 1]", name_only)
        _check(
            subsets + name_only <= 1,
            "data.caption_subsets + data.caption_name_only",
            "<= 1",
            subsets + name_only,
        )
        crop = self.crop_scale_min
        _check(0 < crop <= 1, "data.crop_scale_min", "in (0, 1]", crop)
        if crop != 0.9 and not self.augment:
            raise ConfigError(
                f"data.crop_scale_min={crop} has no effect with data.augment=false (no random "
                "crop): set data.augment=true, or leave data.crop_scale_min at 0.9"
            )
        _check(0 <= self.color_jitter <= 2, "data.color_jitter", "in [0, 2]", self.color_jitter)
        _check(0 <= self.grayscale <= 1, "data.grayscale", "in [0, 1]", self.grayscale)
        _check(0 <= self.blur <= 1, "data.blur", "in [0, 1]", self.blur)
        _check(self.batch_size > 0, "data.batch_size", "> 0", self.batch_size)
        _check(self.workers >= 0, "data.workers", ">= 0", self.workers)
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", ">= 0", self.shuffle_buffer)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW, cosine schedule with linear warmup, gradient clipping."""

    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """Decoupled weight decay (not on biases, norms, gains, logit scale/bias)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr`` over this many steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_ratio: float = 0.0
    """Cosine floor as a fraction of ``lr``."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    fused: bool = True
    """Use AdamW's fused kernel (the same update in one pass over all parameters: the optimizer
    step is ~3x faster on CPU). Not with ``model.fsdp``, whose sharded parameters take the
    per-tensor-list path."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _check(
            0 <= self.beta1 < 1 and 0 <= self.beta2 < 1,
            "optim.beta1/beta2",
            "in [0, 1)",
            (self.beta1, self.beta2),
        )
        _check(self.eps > 0, "optim.eps", "> 0", self.eps)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        _check(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "in [0, 1]", self.min_lr_ratio)
        _check(self.grad_clip >= 0, "optim.grad_clip", ">= 0", self.grad_clip)


@dataclass(frozen=True)
class LossConfig:
    """The contrastive objective. Features are always gathered across ranks with gradients."""

    kind: Literal["infonce", "siglip"] = "infonce"
    """``infonce``: symmetric InfoNCE / NT-Xent with learnable temperature (CLIP);
    ``siglip``: pairwise sigmoid loss with learnable temperature and bias."""
    init_logit_scale: float = 2.6592
    """Initial log of the inverse temperature (ln(1/0.07), as CLIP; SigLIP uses ln(10))."""
    init_logit_bias: float = -10.0
    """Initial SigLIP bias."""
    max_logit_scale: float = 4.6052
    """Clamp of the log inverse temperature after each step (ln(100), as CLIP)."""


# A set's name becomes part of metric keys (``eval/<name>/t2i_R@1``) and of --set paths
# (``train.eval.<name>.data``), so neither "/" nor "." may appear in it.
EVAL_SET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class EvalSetConfig:
    """One named evaluation set of training-time evaluation (an entry of ``train.eval``)."""

    name: str
    """Names the set's figures in metrics.jsonl (``eval/<name>/t2i_R@1``, ...): letters,
    digits, ``_`` and ``-``; unique within ``train.eval``."""
    data: str
    """SHARDS of the evaluation set (folder, brace pattern, glob; ``::``-joined)."""
    k: tuple[int, ...] = (1, 5, 10)
    """Recall@K values (a YAML list or ``1,5,10``); stored sorted, without repeats."""
    limit: int | None = None
    """At most this many samples per rank (None: the whole set); quick checks."""
    batch_size: int = 256
    """Embedding batch size of the evaluation."""
    image_id_field: str | None = None
    """Group captions by this field of each sample's .json (several captions per image)."""

    def __post_init__(self) -> None:
        where = f"train.eval.{self.name}"
        _check(
            bool(EVAL_SET_NAME.match(self.name)),
            "train.eval[].name",
            "letters, digits, '_' or '-'",
            self.name,
        )
        _check(bool(self.data.strip()), f"{where}.data", "a SHARDS path or pattern", self.data)
        _check(bool(self.k) and all(k >= 1 for k in self.k), f"{where}.k", "K values >= 1", self.k)
        # Normalised so that "5,1" and "1,5" are one setting (no spurious resume difference).
        object.__setattr__(self, "k", tuple(sorted(set(self.k))))
        _check(self.batch_size >= 1, f"{where}.batch_size", ">= 1", self.batch_size)
        _check(self.limit is None or self.limit >= 1, f"{where}.limit", ">= 1", self.limit)


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, precision, logging, checkpoints."""

    run_dir: str = "runs/clipforge"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, model/."""
    steps: int = 1000
    """Optimizer steps to train for."""
    accum_steps: int = 1
    """Split each step's batch into this many micro-batches (full batch kept as negatives)."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision (fp16 uses a GradScaler)."""
    seed: int = 0
    """Seed of model init, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: CUDA when available (one GPU per rank), else CPU."""
    cpu_threads: int = 0
    """Intra-op threads of each rank training on CPU. 0: ``OMP_NUM_THREADS`` when set, else the
    cores the rank may run on, divided among the node's ranks, less ``data.workers`` (at least
    1): loader workers and compute threads on the same cores slow each other down (see
    ``clipforge.pretrain.cpu_threads``)."""
    log_every: int = 10
    """Write a metrics.jsonl line every N steps."""
    checkpoint_every: int = 500
    """Save a step checkpoint every N steps (and always at the end)."""
    keep_checkpoints: int = 3
    """Keep the newest K step checkpoints (of either form)."""
    checkpoint_format: Literal["whole", "sharded"] = "whole"
    """``whole``: ``checkpoints/step-N.pt``, the whole state gathered on rank 0 and written by it
    alone (one file; rank 0 holds the whole model and optimizer state in host memory while it
    writes). ``sharded``: a ``torch.distributed.checkpoint`` directory ``checkpoints/step-N/``,
    each rank writing its own shards (FSDP2's, or its share of DDP's replicas) in parallel,
    nothing gathered; it resumes on any world size, as the whole form does. Either way the run
    ends by exporting the whole model to ``model/``."""
    checkpoint_async: bool = False
    """With ``checkpoint_format=sharded``: copy the state to host memory, then write it in a
    background thread while training continues (training is blocked only for the copy; the
    checkpoint is renamed into place when the write completes, and the next save and the end
    of training wait for it). Costs one more host copy of each rank's shards while it writes."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir when there is one."""
    eval_every: int = 0
    """Call the evaluation callback every N steps (0: never)."""
    eval_callback: str = ""
    """Name of an evaluation callback registered under the ``clipforge.eval_callbacks`` entry
    point group (eval registers itself; pretrain never imports eval): ``retrieval`` evaluates
    each set of ``train.eval``."""
    eval: tuple[EvalSetConfig, ...] = ()
    """The named evaluation sets of ``train.eval_callback`` (a YAML list of mappings with
    ``name``, ``data``, ``k``, ``limit``, ``batch_size``, ``image_id_field``); on the command
    line ``--set train.eval.NAME.KEY=VALUE`` sets one key of the set NAME (added if new)."""
    max_nonfinite: int = 5
    """Abort after this many consecutive steps with a non-finite loss or gradient norm."""
    collective_timeout_s: int = 600
    """Seconds any collective (all-reduce, all-gather, broadcast, barrier; gloo and NCCL) may
    wait for a peer before it fails, so a dead or hung peer stops the job (and ``torchrun
    --max-restarts`` restarts it) instead of hanging it forever. Give checkpoint saves and the
    first step's compilation room: 10 min by default."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the ``tensorboard`` package)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Progress display: a bar on interactive terminals, plain lines otherwise."""
    extend_schedule: Literal["", "rewarm", "continue_lr"] = ""
    """How the learning-rate schedule continues when a resume changes train.steps (or optim.lr,
    warmup_steps, schedule, min_lr_ratio): ``rewarm`` warms up from the current rate to optim.lr
    over optim.warmup_steps then decays to the new end; ``continue_lr`` decays from the current
    rate to the new end. Unset, such a resume is refused."""
    ema_decay: float = 0.0
    """Keep an exponential moving average (EMA) of the trainable weights, in float32 (or the
    parameters' dtype if wider), with this decay: after every optimizer step taken (not after a
    step skipped for a non-finite loss) ``ema <- d * ema + (1 - d) * weights``. 0 turns it off;
    must be in [0, 1), e.g. 0.999 (averages over roughly the last 1 / (1 - d) steps). When on,
    the exported ``model/`` (what eval and index load) and the training-time evaluation
    (``train.eval`` / ``train.eval_callback``) use the EMA weights; checkpoints hold both the raw
    weights (what training continues from) and the EMA. Under FSDP the EMA is sharded like the
    parameters. May change on resume: turned on for a checkpoint without an EMA, the EMA starts
    from the checkpoint's weights; turned off, a checkpoint's EMA is ignored (both logged)."""
    ema_warmup: bool = True
    """With ``ema_decay``: warm the decay up as TensorFlow's ``ExponentialMovingAverage``
    (``num_updates``) does, so the early average is not dominated by the random initial
    weights: the n-th update (n = 0, 1, 2, ... EMA updates before it) uses
    ``d = min(ema_decay, (1 + n) / (10 + n))``. false: ``d = ema_decay`` from the first."""

    def __post_init__(self) -> None:
        _check(self.steps > 0, "train.steps", "> 0", self.steps)
        _check(0.0 <= self.ema_decay < 1.0, "train.ema_decay", "in [0, 1) (0: off)", self.ema_decay)
        _check(self.accum_steps > 0, "train.accum_steps", "> 0", self.accum_steps)
        _check(self.cpu_threads >= 0, "train.cpu_threads", ">= 0", self.cpu_threads)
        _check(self.log_every > 0, "train.log_every", "> 0", self.log_every)
        _check(self.checkpoint_every > 0, "train.checkpoint_every", "> 0", self.checkpoint_every)
        _check(self.keep_checkpoints > 0, "train.keep_checkpoints", "> 0", self.keep_checkpoints)
        _check(self.eval_every >= 0, "train.eval_every", ">= 0", self.eval_every)
        _check(
            not self.checkpoint_async or self.checkpoint_format == "sharded",
            "train.checkpoint_async",
            "false unless train.checkpoint_format=sharded (whole-state checkpoints are written "
            "by rank 0 alone, synchronously)",
            self.checkpoint_async,
        )
        _check(self.max_nonfinite > 0, "train.max_nonfinite", "> 0", self.max_nonfinite)
        _check(
            self.collective_timeout_s > 0,
            "train.collective_timeout_s",
            "> 0",
            self.collective_timeout_s,
        )
        names = [s.name for s in self.eval]
        repeated = sorted({n for n in names if names.count(n) > 1})
        _check(not repeated, "train.eval names", "unique", repeated)
        # Sets that nothing would evaluate are a mistake, not a silent no-op.
        _check(
            not self.eval or bool(self.eval_callback),
            "train.eval_callback",
            "set (e.g. retrieval) when train.eval lists sets",
            self.eval_callback,
        )


@dataclass(frozen=True)
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.data.batch_size % self.train.accum_steps:
            raise ConfigError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"train.accum_steps ({self.train.accum_steps})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dicts and lists (tuples become lists: what YAML writes and reads back,
        so a saved config compares equal to the one it came from)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Settings a resume may change: they do not change what a checkpoint holds (parameter shapes,
# optimizer state, the data stream). Every other difference from the checkpoint's config is
# refused. The schedule settings among them (pretrain.schedule.SCHEDULE_KEYS) also need a
# train.extend_schedule rule.
RESUME_MUTABLE = frozenset(
    {
        "train.run_dir",
        "train.steps",
        "train.resume",
        "train.extend_schedule",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.checkpoint_format",  # both forms hold the same state and resume alike
        "train.checkpoint_async",
        "train.eval_every",
        "train.eval_callback",
        "train.eval",  # what is measured during training, not what is trained
        "train.max_nonfinite",
        "train.collective_timeout_s",
        # the raw weights are what training continues from; the EMA rides along (see _resume)
        "train.ema_decay",
        "train.ema_warmup",
        "train.tensorboard",
        "train.progress",
        "train.device",
        "train.cpu_threads",
        "train.precision",
        "train.accum_steps",
        "data.allow_global_batch_change",  # (data.batch_size itself only with it set)
        # re-mined with the model as it is now, mid-run: a side table, not the data position
        "data.hard_negatives",
        "data.hard_negatives_per_sample",
        "optim.lr",
        "optim.warmup_steps",
        "optim.schedule",
        "optim.min_lr_ratio",
        "optim.grad_clip",
        "optim.fused",
        "model.grad_checkpointing",
        "model.compile",
        "model.fsdp",
        "model.pooled_forward",
    }
)


def config_differences(saved: dict[str, Any], config: Config) -> dict[str, tuple[Any, Any]]:
    """``section.key`` -> (saved value, new value) for every setting that differs. A key the
    saved config lacks (added since it was written) counts as its default."""
    defaults = Config().to_dict()
    new = config.to_dict()
    out: dict[str, tuple[Any, Any]] = {}
    for section, values in new.items():
        old_section = saved.get(section)
        if not isinstance(old_section, dict):
            old_section = {}
        for key, value in values.items():
            old = old_section.get(key, defaults[section][key])
            if old != value:
                out[f"{section}.{key}"] = (old, value)
    return out


def _check(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: the tests and smoke runs.
    "tiny": {
        "model": {"name": "clipforge-tiny"},
        "data": {"batch_size": 32, "workers": 1, "shuffle_buffer": 256},
        "optim": {"lr": 1e-3, "warmup_steps": 10, "weight_decay": 0.1},
        "train": {"steps": 50, "log_every": 5, "checkpoint_every": 25},
    },
    # The demo: learns the emoji captions in a few minutes on 2 CPU cores.
    "demo": {
        "model": {"name": "clipforge-demo"},
        "data": {"batch_size": 128, "workers": 1, "shuffle_buffer": 1000},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.1},
        "train": {"steps": 300, "log_every": 10, "checkpoint_every": 100},
    },
    # The benchmarks/ comparison with open_clip_train (20.8 M parameters, 64 px).
    "bench-tiny": {
        "model": {"name": "bench-tiny"},
        "data": {"batch_size": 128, "workers": 1, "shuffle_buffer": 1000},
        "train": {"steps": 30, "log_every": 1},
    },
    "vit-b-32": {
        "model": {"name": "ViT-B-32"},
        "data": {"batch_size": 256, "workers": 8, "shuffle_buffer": 5000},
        "optim": {"lr": 5e-4, "warmup_steps": 2000},
        "train": {"steps": 100000, "precision": "bf16", "log_every": 50, "checkpoint_every": 2000},
    },
    "vit-b-16": {
        "model": {"name": "ViT-B-16"},
        "data": {"batch_size": 256, "workers": 8, "shuffle_buffer": 5000},
        "optim": {"lr": 5e-4, "warmup_steps": 2000},
        "train": {"steps": 100000, "precision": "bf16", "log_every": 50, "checkpoint_every": 2000},
    },
    "siglip-b-16": {
        "model": {"name": "ViT-B-16-SigLIP"},
        "data": {"batch_size": 256, "workers": 8, "shuffle_buffer": 5000},
        "loss": {"kind": "siglip", "init_logit_scale": 2.3026, "init_logit_bias": -10.0},
        "train": {"steps": 100000, "precision": "bf16", "log_every": 50, "checkpoint_every": 2000},
    },
}


# ----------------------------------------------------------------------------- loading


def load_config(name_or_file: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A preset name or YAML file, then ``section.key=value`` overrides, validated."""
    if name_or_file in PRESETS:
        tree = _deep_copy(PRESETS[name_or_file])
    else:
        path = Path(name_or_file)
        if not path.is_file():
            raise ConfigError(
                f"--config {name_or_file!r} is neither a preset ({', '.join(PRESETS)}) nor a file"
            )
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: expected a mapping of sections, got {type(loaded).__name__}"
            )
        base = loaded.pop("base", None)
        if base is not None and base not in PRESETS:
            raise ConfigError(f"{path}: base preset {base!r} is not one of {', '.join(PRESETS)}")
        tree = _merge(_deep_copy(PRESETS[base]) if base else {}, loaded)
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        section, *keys = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _apply_override(tree, section, keys, value, item)
    return config_from_dict(tree)


def _apply_override(
    tree: dict[str, Any], section: str, path: list[str], value: Any, item: str
) -> None:
    """``section.key=value``, or ``section.key.NAME.field=value`` for a key that is a list of
    named entries (``train.eval``): sets ``field`` of the entry named NAME, appending a new
    entry when there is none, so several sets are given one key at a time."""
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {node!r}")
    key, rest = path[0], path[1:]
    if not rest:
        node[key] = value
        return
    entry_cls = _named_entry_type(_section_hints(section).get(key))
    if entry_cls is None:
        raise ConfigError(f"--set {item!r}: {section}.{key} has no sub-keys")
    if len(rest) != 2:
        fields = [f.name for f in dataclasses.fields(entry_cls) if f.name != "name"]
        raise ConfigError(
            f"--set {item!r}: expected {section}.{key}.NAME.KEY=value, KEY one of {fields} "
            f"(e.g. --set {section}.{key}.val.data=SHARDS)"
        )
    entry_name, field_name = rest
    entries = node.get(key)
    if entries is None:
        entries = node[key] = []
    if not isinstance(entries, list):
        raise ConfigError(f"{section}.{key} must be a list of mappings, got {entries!r}")
    for entry in entries:
        if isinstance(entry, dict) and str(entry.get("name")) == entry_name:
            break
    else:
        entry = {"name": entry_name}
        entries.append(entry)
    entry[field_name] = value


def _section_hints(section: str) -> dict[str, Any]:
    cls = typing.get_type_hints(Config).get(section)
    return typing.get_type_hints(cls) if cls is not None else {}


def _named_entry_type(tp: Any) -> type | None:
    """The dataclass of ``tuple[X, ...]`` when X is a dataclass with a ``name`` field."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        entry = args[0]
        if isinstance(entry, type) and dataclasses.is_dataclass(entry):
            return entry if "name" in {f.name for f in dataclasses.fields(entry)} else None
    return None


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dicts (unknown keys are errors)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = sorted(set(tree) - set(sections))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; sections are {sorted(sections)}")
    hints = typing.get_type_hints(Config)
    built = {}
    for name, value in tree.items():
        if not isinstance(value, dict):
            raise ConfigError(f"config section {name!r} must be a mapping, got {value!r}")
        built[name] = _build_section(hints[name], value, name)
    try:
        return Config(**built)
    except TypeError as e:  # pragma: no cover - guarded by the checks above
        raise ConfigError(str(e)) from None


def _build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'{section}.{k}' for k in unknown]}; {section} has {sorted(hints)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    missing = sorted(
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    )
    if missing:
        raise ConfigError(f"{section}: missing required key(s) {missing}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if args[0] is int and isinstance(value, str):  # "1,5,10" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            try:
                value = [int(v) for v in value]
            except ValueError:
                raise ConfigError(f"{name} must be integers, got {value!r}") from None
        elif args[0] is int and isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        if dataclasses.is_dataclass(args[0]):
            return tuple(_coerce_entry(v, args[0], name, i) for i, v in enumerate(value))
        return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported config type {tp}")  # pragma: no cover


def _coerce_entry(value: Any, cls: Any, name: str, index: int) -> Any:
    """One mapping of a list of dataclass entries, named by its ``name`` when it has one."""
    if not isinstance(value, dict):
        raise ConfigError(f"{name}[{index}] must be a mapping, got {value!r}")
    where = f"{name}.{value['name']}" if "name" in value else f"{name}[{index}]"
    return _build_section(cls, value, where)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(base[key], value)
        else:
            base[key] = value
    return base


def _deep_copy(tree: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from clipforge.data_tools.atomic import write_bytes_atomic

    write_bytes_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False).encode())


def describe_fields() -> str:
    """Every config key with its default and docstring (``clipforge-pretrain --help-config``)."""
    import ast
    import inspect

    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = _field_docs(cls, ast, inspect)
        lines.append(f"{section.name}:")
        for f in dataclasses.fields(cls):
            lines.append(f"  {section.name}.{f.name} = {_default_text(f)}")
            if f.name in docs:
                lines.append("      " + " ".join(docs[f.name].split()))
            entry = _named_entry_type(typing.get_type_hints(cls)[f.name])
            if entry is not None:  # the keys of each entry of a list (train.eval)
                entry_docs = _field_docs(entry, ast, inspect)
                for ef in dataclasses.fields(entry):
                    lines.append(f"    {section.name}.{f.name}[].{ef.name} = {_default_text(ef)}")
                    if ef.name in entry_docs:
                        lines.append("        " + " ".join(entry_docs[ef.name].split()))
    return "\n".join(lines)


def _default_text(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(_plain(f.default))
    if f.default_factory is not dataclasses.MISSING:
        return repr(_plain(f.default_factory()))
    return "(required)"


def _field_docs(cls: type, ast: Any, inspect: Any) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs
