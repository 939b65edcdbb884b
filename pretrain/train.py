"""The training loop: :func:`train` sets up, :meth:`Trainer.train` reads top to bottom.

Everything is counted in optimizer steps and samples seen. Rank 0 writes; every rank computes.
The pieces around the loop live in their own modules: the optimizer and the schedule's resume
rules in :mod:`~clipforge.pretrain.optim`, the metrics sinks in
:mod:`~clipforge.pretrain.metrics_log`, throughput and MFU in
:mod:`~clipforge.pretrain.throughput`, one step's forward/backward in
:mod:`~clipforge.pretrain.step`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.data_tools.atomic import OutOfSpaceError, temp_path_for
from clipforge.data_tools.reader import (
    ReaderConfig,
    ShardLoader,
    StreamPosition,
    check_exact_pass,
    make_loader,
    parse_shard_spec,
)
from clipforge.data_tools.resplit import reseed_resampled, resplit_exact_pass
from clipforge.data_tools.transforms import (
    CaptionPartsSubset,
    StyleAugment,
    clip_image_transforms,
)
from clipforge.pretrain.checkpoint import (
    NoIntactCheckpoint,
    checkpoint_path,
    is_sharded,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest_intact,
    prune_checkpoints,
    remove_temp_files,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clipforge.pretrain.config import (
    RESUME_MUTABLE,
    Config,
    ConfigError,
    config_differences,
    save_config,
)
from clipforge.pretrain.cpu_memory import keep_freed_memory
from clipforge.pretrain.cpu_threads import set_compute_threads
from clipforge.pretrain.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    new_cpu_group,
    shutdown,
)
from clipforge.pretrain.ema import ModelEma, with_ema_weights
from clipforge.pretrain.hard_negatives import load_hard_negatives, step_negatives
from clipforge.pretrain.losses import make_loss
from clipforge.pretrain.metrics_log import MetricsLog
from clipforge.pretrain.models import build_model, export_open_clip, load_tokenizer
from clipforge.pretrain.optim import legacy_schedule, make_optimizer, resume_schedule, set_lr
from clipforge.pretrain.parallelize import (
    clip_grad_norm,
    full_model_state_dict,
    full_state_dicts,
    load_full_state_dicts,
    parallelize,
    unwrap,
)
from clipforge.pretrain.pooled_forward import batch_text_positions
from clipforge.pretrain.rundir import (
    METRICS_NAME,
    RESTARTS_NAME,
    RunLock,
    acquire_run_lock,
    append_jsonl,
    last_logged_loss,
    truncate_metrics,
)
from clipforge.pretrain.schedule import (
    SCHEDULE_KEYS,
    Schedule,
    initial_schedule,
    lr_at,
    schedule_from_state,
    schedule_state,
)
from clipforge.pretrain.sharded_checkpoint import (
    PendingSave,
    load_shards,
    model_optimizer_state,
    publish,
    read_whole,
    save_shards,
    start_async_save,
)
from clipforge.pretrain.step import forward_backward
from clipforge.pretrain.throughput import StepWindow, count_flops_per_sample, utilization

log = logging.getLogger(__name__)

EvalCallback = Callable[[nn.Module, int], dict[str, float]]
"""(model, step) -> metrics: called every ``train.eval_every`` steps on every rank (with
``train.ema_decay`` on, the model holds the EMA weights during the call)."""

EvalCallbackFactory = Callable[[Config], EvalCallback]
"""What a ``clipforge.eval_callbacks`` entry point is: called once per rank with the run config
(whose ``train.eval`` sets it evaluates) before the first step; returns the callback."""

EVAL_CALLBACK_GROUP = "clipforge.eval_callbacks"


class TrainingAborted(RuntimeError):
    """Training cannot go on (the message says why)."""


@dataclass(frozen=True)
class TrainResult:
    """What a finished run left behind."""

    run_dir: Path
    """The run directory."""
    steps: int
    """Optimizer steps done (in total, counting those before a resume)."""
    samples_seen: int
    """Samples consumed over all ranks."""
    last_loss: float
    """This rank's loss at the last step."""
    model_dir: Path | None
    """The exported open_clip model folder (None on ranks other than 0)."""
    already_complete: bool = False
    """The run had reached ``train.steps`` before this call, which trained nothing and changed
    nothing (``last_loss`` is then the last logged one, NaN if none was)."""


def train(config: Config, eval_callback: EvalCallback | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns when ``train.steps`` are done."""
    info = init_distributed(config.train.device, timeout_s=config.train.collective_timeout_s)
    try:
        trainer = Trainer(config, info, eval_callback)
        try:
            return trainer.train()
        finally:
            trainer.close()
    finally:
        shutdown(info)


def resolve_eval_callback(name: str) -> EvalCallbackFactory:
    """The factory of an evaluation callback registered by another package under
    ``clipforge.eval_callbacks``."""
    found = {ep.name: ep for ep in entry_points(group=EVAL_CALLBACK_GROUP)}
    if name not in found:
        raise ConfigError(
            f"train.eval_callback {name!r} is not registered (known: {sorted(found) or 'none'})"
        )
    return found[name].load()


@dataclass(frozen=True)
class _Plan:
    """What rank 0 decided from the run directory before anything is written (sent to all)."""

    checkpoint: str | None
    """The checkpoint to resume from (None: a fresh start)."""
    step: int
    """The step the run continues from (0: a fresh start)."""
    samples_seen: int
    """Samples consumed over all ranks up to ``step``."""
    complete: bool
    """The checkpoint is at or past ``train.steps``: nothing to train, nothing to change."""
    schedule: list[dict[str, Any]]
    """The learning-rate schedule to follow, as :func:`schedule_state` writes it."""
    changes: dict[str, tuple[Any, Any]]
    """Settings that differ from the checkpoint's (all allowed on resume)."""
    last_loss: float = float("nan")
    """The last logged loss of a complete run (NaN otherwise)."""
    batch_size: int = 0
    """Samples per rank per step in this run (see :meth:`Trainer._batch_on_resume`)."""
    positions: list[dict[str, Any]] | None = None
    """Each new rank's data position when the checkpoint was written by another world size
    (None: the checkpoint's own positions, one per rank)."""
    world_change: dict[str, Any] | None = None
    """What a resume on another world size changed (for the log and restarts.jsonl)."""


class Trainer:
    """Holds the model, optimizer, data and counters of one run.

    Setup order matters: rank 0 takes the run directory's lock, reads and checks what is there
    (checkpoints, the saved config, the schedule) and only then does anything get written, so a
    refused resume leaves the run directory as it was.
    """

    def __init__(
        self, config: Config, info: DistInfo, eval_callback: EvalCallback | None = None
    ) -> None:
        self.config, self.info = config, info
        self.run_dir = Path(config.train.run_dir)
        self.metrics_file = self.run_dir / METRICS_NAME
        self._lock: RunLock | None = None
        # put back by close(): training's thread count must not outlive it in the caller's
        # process (the demo embeds and evaluates after training, in the same process)
        self._threads_before = torch.get_num_threads()
        self._state: dict[str, Any] | None = None  # rank 0: the checkpoint read while planning
        # built last in setup: absent when setup stopped early or the run was already complete
        self.metrics: MetricsLog | None = None
        try:
            self._setup(eval_callback)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the metrics sinks and give up the run directory's lock (rank 0); idempotent."""
        if self.metrics is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if torch.get_num_threads() != self._threads_before:
            torch.set_num_threads(self._threads_before)

    def _setup(self, eval_callback: EvalCallback | None) -> None:
        config, info, tc = self.config, self.info, self.config.train
        self._preflight()
        self.plan = self._make_plan()
        self.step, self.samples_seen = self.plan.step, self.plan.samples_seen
        self.batch_size = self.plan.batch_size  # per rank: data.batch_size, or derived on resume
        if self.plan.complete:  # nothing is built: train() only reports (and exports if need be)
            return
        if eval_callback is None and tc.eval_callback:
            eval_callback = resolve_eval_callback(tc.eval_callback)(config)
        self.eval_callback = eval_callback

        if info.device.type == "cpu":
            keep_freed_memory()  # activations reused, not page-faulted in every step
            set_compute_threads(tc.cpu_threads, config.data.workers)
        torch.manual_seed(tc.seed)  # before the model: its initial weights come from this seed
        self._build_model()
        # sharded saves synchronise over a gloo group of their own: an asynchronous one's
        # collectives run in a background thread while training's run on the default group
        self._checkpoint_group = (
            new_cpu_group(info, tc.collective_timeout_s)
            if tc.checkpoint_format == "sharded"
            else None
        )
        self._pending_save: PendingSave | None = None
        self.loss_fn = make_loss(config.loss.kind)
        self.optimizer = make_optimizer(unwrap(self.model), config)
        # from the initial weights; _resume loads a checkpoint's EMA (or restarts it) into it
        self.ema = (
            ModelEma(unwrap(self.model), tc.ema_decay, tc.ema_warmup) if tc.ema_decay else None
        )
        self.schedule: Schedule = schedule_from_state(self.plan.schedule)
        self._set_precision()
        self.nonfinite_steps = 0  # over the whole run (restored on resume)
        self._consecutive_bad = 0  # non-finite steps in a row, for train.max_nonfinite
        position = self._resume()
        self._record_start()
        self.loader = self._make_loader(position)
        self.metrics = MetricsLog(
            self.metrics_file,
            total_steps=tc.steps,
            enabled=info.is_main,
            tensorboard_dir=self.run_dir / "tensorboard" if tc.tensorboard else None,
            progress=tc.progress,
        )

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Train from ``self.step`` to ``train.steps``; one iteration is one optimizer step over
        one global batch (``data.batch_size`` per rank, split in ``train.accum_steps``)."""
        tc = self.config.train
        if self.plan.complete:
            return self._already_complete()
        assert self.metrics is not None
        global_batch = self.batch_size * self.info.world_size
        batches = self._batches()
        window = StepWindow()
        self.metrics.start_progress(self.step)
        loss = float("nan")
        try:
            while self.step < tc.steps:
                # The rate is a pure function of the step (no torch scheduler state), so a run
                # resumed from a checkpoint trains with exactly the rates of an unbroken one.
                lr = lr_at(self.schedule, self.step)
                set_lr(self.optimizer, lr)
                t0 = time.perf_counter()
                batch = next(batches)
                t_data = time.perf_counter() - t0  # time blocked on the loader: data-wait
                out, text_positions = self._forward_backward(batch)
                # float() waits for the device: from here on the step's compute is done, and the
                # loss is known on this rank (not averaged: that costs a collective per step).
                loss = float(out["loss"])
                grad_norm = self._clip_gradients()
                if self._optimizer_step(loss, grad_norm) and self.ema is not None:
                    self.ema.update()  # only after a step taken: a skipped one changed nothing
                self.step += 1
                self.samples_seen += global_batch
                window.add(global_batch, t_data, time.perf_counter() - t0, text_positions)
                self.metrics.progress(self.step, loss)
                # The last step always logs and checkpoints, whatever the intervals: the run's
                # final state is on disk and its final loss in metrics.jsonl.
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log(window.flush(loss, out["logit_scale"], grad_norm), lr)
                if self.eval_callback and tc.eval_every and self.step % tc.eval_every == 0:
                    self._evaluate()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                    self._save_checkpoint(loss)
                _crash_once_if_asked(self.step, self.info.rank)
        finally:
            batches.close()  # the data workers stop now, also when a step fails
        self._finish_pending_save()  # the last checkpoint is in place before the run reports
        model_dir = self._export()
        return TrainResult(self.run_dir, self.step, self.samples_seen, loss, model_dir)

    # ------------------------------------------------------------------ setup pieces
    def _preflight(self) -> None:
        """Fail before the first step, with a clear message, on what would fail later; rank 0
        takes the run directory's lock (the other ranks of this job never do)."""
        cfg, info = self.config, self.info
        if not cfg.data.train:
            raise ConfigError(
                "data.train is empty: give the training shards (--set data.train=PATH_OR_PATTERN)"
            )
        sources = parse_shard_spec(cfg.data.train)
        if not cfg.data.resampled:
            check_exact_pass(sum(len(s.urls) for s in sources), info.world_size, cfg.data.workers)
        # read and checked before the run directory is touched
        self.hard_negatives = load_hard_negatives(cfg.data, log_it=info.is_main)
        error = None
        if info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                # creating the lock file is also the writability probe
                self._lock = acquire_run_lock(self.run_dir)
            except ConfigError as e:
                error = str(e)
            except OSError as e:
                error = f"train.run_dir {self.run_dir} is not writable ({e})"
        error = broadcast_object(error, info)
        if error:
            raise ConfigError(error)
        if cfg.train.precision == "fp16" and info.device.type == "cpu":
            log.warning("fp16 autocast on CPU is slow and rarely useful; bf16 is the CPU choice")

    def _make_plan(self) -> _Plan:
        """Rank 0 reads the run directory and decides; every rank gets the decision (or the
        error, so that all ranks of the job stop with the same message)."""
        plan: _Plan | None = None
        error: str | None = None
        if self.info.is_main:
            try:
                plan = self._decide()
            except (ConfigError, NoIntactCheckpoint) as e:
                error = str(e)
            except Exception as e:
                broadcast_object((None, f"rank 0 failed: {type(e).__name__}: {e}"), self.info)
                raise
        plan, error = broadcast_object((plan, error), self.info)
        if error:
            raise ConfigError(error)
        assert plan is not None
        return plan

    def _decide(self) -> _Plan:
        """Fresh start, resume (with which schedule) or nothing to do; raises on a resume that
        would not continue the same run. Reads only, apart from sweeping temp files of killed
        writes and renaming corrupt checkpoints aside."""
        cfg, tc = self.config, self.config.train
        ckpt_dir = self.run_dir / "checkpoints"
        self._sweep_temp_files()
        schedule0 = schedule_state(initial_schedule(cfg))
        fresh = _Plan(None, 0, 0, False, schedule0, {}, batch_size=cfg.data.batch_size)
        if not tc.resume:
            found = list_checkpoints(ckpt_dir)
            if found:
                raise ConfigError(
                    f"train.resume=false but {ckpt_dir} holds checkpoints (newest "
                    f"{found[-1][1].name}): a new run there would mix its checkpoints with the "
                    "old ones; use another train.run_dir, or delete that folder"
                )
            return fresh
        newest = load_newest_intact(ckpt_dir)
        if newest is None:
            return fresh
        path, state = newest
        saved, diffs = self._check_resumable(path, state)
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        self._state = state
        if step >= tc.steps:
            loss = last_logged_loss(self.metrics_file, step)
            if loss is None:
                loss = float(state.get("last_loss", float("nan")))
            return _Plan(str(path), step, samples_seen, True, [], diffs, loss)
        batch_size, world_change = self._batch_on_resume(path, state, saved)
        positions = None
        if world_change is not None:
            positions, world_change["data"] = self._positions_on_new_world(state, step)
            log.info(
                "resuming %s, written by %d rank(s), on %d: per-rank batch %d -> %d (global "
                "batch %d -> %d); %s",
                path.name,
                *world_change["world_size"],
                *world_change["batch_size"],
                *world_change["global_batch"],
                world_change["data"],
            )
        if "schedule" in state:
            schedule = schedule_from_state(state["schedule"])
        else:  # written before schedules were stored: the one its own config described
            schedule = legacy_schedule(saved, cfg)
        schedule = resume_schedule(schedule, step, diffs, cfg, str(path))
        for key, (old, new) in diffs.items():
            if key not in SCHEDULE_KEYS and key != "train.extend_schedule":
                log.info("resume changes %s: %r -> %r", key, old, new)
        return _Plan(
            str(path),
            step,
            samples_seen,
            False,
            schedule_state(schedule),
            diffs,
            batch_size=batch_size,
            positions=positions,
            world_change=world_change,
        )

    def _batch_on_resume(
        self, path: Path, state: dict[str, Any], saved: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | None]:
        """This run's per-rank batch, and what a change of world size changed (None: none).

        The global batch is the invariant of a run (it is what the learning rate and schedule
        were set for): on another world size each rank's batch becomes global / world size,
        and ``train.accum_steps`` still splits it (raise that to bound the memory of a bigger
        per-rank batch). ``data.allow_global_batch_change=true`` takes ``data.batch_size``
        literally instead; nothing else is scaled either way.
        """
        cfg, new_world = self.config, self.info.world_size
        old_world = len(state["data_positions"])
        saved_batch = int(saved.get("data", {}).get("batch_size", cfg.data.batch_size))
        old_batch = int(state.get("batch_size", saved_batch))  # per rank, as it last trained
        old_global = int(state.get("global_batch", old_batch * old_world))
        if cfg.data.allow_global_batch_change:
            batch = cfg.data.batch_size
        elif old_global % new_world:
            raise ConfigError(
                f"{path} trained with a global batch of {old_global} ({old_world} rank(s) x "
                f"{old_batch}), which {new_world} ranks cannot share evenly: resume on a "
                f"world size that divides {old_global}, or set "
                "data.allow_global_batch_change=true and the per-rank data.batch_size to "
                "train with from now on"
            )
        else:
            batch = old_global // new_world
        accum = cfg.train.accum_steps
        if batch % accum:
            raise ConfigError(
                f"resuming {path} on {new_world} rank(s) makes the per-rank batch {batch} "
                f"(global batch {batch * new_world}), which train.accum_steps={accum} does not "
                "divide: set train.accum_steps to a divisor of it"
            )
        if old_world == new_world and batch == old_batch:
            return batch, None
        change = {
            "world_size": [old_world, new_world],
            "batch_size": [old_batch, batch],
            "global_batch": [old_global, batch * new_world],
        }
        return batch, change

    def _positions_on_new_world(
        self, state: dict[str, Any], step: int
    ) -> tuple[list[dict[str, Any]] | None, str]:
        """Each new rank's data position when the world size changed, and what was done."""
        cfg, world = self.config, self.info.world_size
        old = [StreamPosition.from_dict(p) for p in state["data_positions"]]
        if len(old) == world:
            return None, "data positions kept"
        if cfg.data.resampled:
            new = reseed_resampled(step, world, cfg.data.workers)
            how = f"resampled streams re-seeded from (seed, step {step}, rank, worker)"
        else:
            new = resplit_exact_pass(
                parse_shard_spec(cfg.data.train),
                old,
                seed=cfg.train.seed,
                shuffle_buffer=cfg.data.shuffle_buffer,
                world_size=world,
                workers=cfg.data.workers,
            )
            epochs = [e for e, _ in new[0].plans]
            how = (
                f"exact pass: the rest of epoch(s) {epochs} re-split over {world} rank(s) x "
                f"{max(cfg.data.workers, 1)} worker(s), each sample still read once"
            )
        return [p.to_dict() for p in new], how

    def _sweep_temp_files(self) -> None:
        """Remove the temp files of writes that a killed run left (never a finished file)."""
        folders = (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "model")
        removed = [p for folder in folders for p in remove_temp_files(folder)]
        if removed:
            log.info(
                "removed %d temp file(s) left by an interrupted write: %s",
                len(removed),
                ", ".join(str(p.relative_to(self.run_dir)) for p in removed),
            )

    def _check_resumable(
        self, path: Path, state: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, tuple[Any, Any]]]:
        """The checkpoint's saved config and the settings that differ from it; raises when the
        resume would not continue the same run (another world size, a refused change)."""
        saved: dict[str, Any] = state["config"] if isinstance(state.get("config"), dict) else {}
        if not saved:
            log.warning("%s records no config: the resume cannot check its settings", path)
        diffs = config_differences(saved, self.config) if saved else {}
        mutable = RESUME_MUTABLE
        if self.config.data.allow_global_batch_change:
            mutable = mutable | {"data.batch_size"}
        refused = {k: v for k, v in diffs.items() if k not in mutable}
        if refused:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(
                f"cannot resume {path} with different settings ({listed}): they change what "
                "the checkpoint holds or the data it continues; set them back, or use another "
                "train.run_dir (settings a resume may change: see the README's pretrain section)"
            )
        return saved, diffs

    def _build_model(self) -> None:
        """The model, its open_clip config and preprocessing, its FLOPs, wrapped for the job."""
        config = self.config
        model, self.model_cfg = build_model(
            config.model,
            siglip=config.loss.kind == "siglip",
            init_logit_scale=config.loss.init_logit_scale,
            init_logit_bias=config.loss.init_logit_bias,
        )
        self.preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        # counted on the bare model: the wrappers' hooks would be counted too
        self.flops = count_flops_per_sample(model, self.model_cfg)
        # FSDP all-gathers parameters in bf16 under bf16 autocast (half the bytes; the compute
        # is bf16 anyway) and reduces gradients in float32 (see parallelize).
        fsdp_bf16 = config.model.fsdp and config.train.precision == "bf16"
        self.model = parallelize(
            model, config.model, self.info, param_dtype=torch.bfloat16 if fsdp_bf16 else None
        )

    def _set_precision(self) -> None:
        """Autocast for bf16/fp16 and, for fp16 only, a gradient scaler: fp16's narrow exponent
        underflows small gradients unless the loss is scaled up first (bf16 has fp32's range)."""
        precision, dev_type = self.config.train.precision, self.info.device.type
        self.scaler = torch.amp.GradScaler(dev_type) if precision == "fp16" else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (
            (lambda: torch.autocast(dev_type, dtype=dtype)) if dtype else (contextlib.nullcontext)
        )

    def _make_loader(self, position: StreamPosition) -> ShardLoader:
        cfg = self.config
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"]["image_size"])
        size = size[0] if isinstance(size, (list, tuple)) else size
        per_sample, per_batch = clip_image_transforms(
            int(size),
            train=cfg.data.augment,
            mean=self.preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
            std=self.preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
            crop_scale_min=cfg.data.crop_scale_min,
            style=StyleAugment(cfg.data.color_jitter, cfg.data.grayscale, cfg.data.blur),
        )
        tokenizer = load_tokenizer(cfg.model.name)
        # drop_last: every rank's batch must have the same size for the gathered loss.
        reader = ReaderConfig(
            batch_size=self.batch_size,
            resampled=cfg.data.resampled,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
            drop_last=True,
        )
        return make_loader(
            cfg.data.train,
            per_sample,
            per_batch,
            tokenizer,
            reader,
            num_workers=cfg.data.workers,
            rank=self.info.rank,
            world_size=self.info.world_size,
            position=position,
            pin_memory=self.info.device.type == "cuda",
            caption_transform=(
                CaptionPartsSubset(
                    cfg.data.caption_subsets,
                    name_only=cfg.data.caption_name_only,
                    name_field=cfg.data.caption_name_field,
                )
                if cfg.data.caption_subsets or cfg.data.caption_name_only
                else None
            ),
            hard_negatives=self.hard_negatives,
        )

    def _batches(self) -> Generator[dict[str, Any], None, None]:
        """Endless batches: a new exact pass starts when one ends."""
        while True:
            empty = True
            position = self.loader.position
            # a pass re-split over a new world size may leave a rank nothing in that epoch, and
            # a checkpoint taken at the last batch of a pass resumes with nothing left in it
            planned = self.loader.planned(position.epoch)
            resumed_mid_pass = any(position.consumed)
            for batch in self.loader:
                empty = False
                yield batch
            if empty and not planned and not resumed_mid_pass:
                raise TrainingAborted(
                    f"data.train {self.config.data.train!r} yielded no "
                    f"samples on rank {self.info.rank} (skipped: "
                    f"{dict(self.loader.skipped)})"
                )

    def _resume(self) -> StreamPosition:
        """Load the planned checkpoint (every rank) and return this rank's data position."""
        if self.plan.checkpoint is None:
            return StreamPosition()
        path = self.plan.checkpoint
        sharded = is_sharded(path)
        state = self._state
        if state is None:  # rank 0 read it while planning; a sharded one's sidecar suffices
            state = load_checkpoint(path, tensors=not sharded)
        self._state = None  # not kept for the whole run
        if sharded:  # each rank reads its own slices, whatever world size wrote them
            ema = self.ema if "ema_updates" in state else None  # its shards, loaded in place
            extra = {"ema": ema.state_dict()} if ema is not None else None
            load_shards(unwrap(self.model), self.optimizer, path, extra=extra)
        else:
            load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self._resume_ema(path, state, sharded)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        # each rank its own RNG on the same world size; on another, every rank rank 0's
        per_rank = state.get("rng_per_rank") or []
        same_world = len(per_rank) == self.info.world_size
        set_rng_state(per_rank[self.info.rank] if same_world else state["rng"])
        if self.info.is_main:
            log.info(
                "resumed from %s (step %d, %d samples seen)",
                self.plan.checkpoint,
                self.step,
                self.samples_seen,
            )
        positions = self.plan.positions or state["data_positions"]
        return StreamPosition.from_dict(positions[self.info.rank])

    def _resume_ema(self, path: str, state: dict[str, Any], sharded: bool) -> None:
        """The EMA after the model and optimizer loaded (every rank): the checkpoint's (a
        sharded one's shards already loaded in place), or started from the checkpoint's
        weights when it has none; a checkpoint's EMA is ignored with ``train.ema_decay=0``."""
        has_ema = "ema_updates" in state
        if self.ema is None:
            if has_ema and self.info.is_main:
                log.info("%s holds an EMA of the weights: ignored (train.ema_decay=0)", path)
            return
        if not has_ema:
            self.ema.reset_to_model()
            if self.info.is_main:
                log.info(
                    "%s holds no EMA of the weights: the EMA (train.ema_decay=%g) starts from "
                    "its weights",
                    path,
                    self.ema.decay,
                )
            return
        if not sharded:
            self.ema.load_full_state_dict(state["ema"], where=path)
        self.ema.updates = int(state["ema_updates"])

    def _record_start(self) -> None:
        """Now that the start is sure: config.yaml, metrics.jsonl cut back to the checkpoint
        (or removed on a fresh start) and one restarts.jsonl line (rank 0 writes)."""
        hosts = _gather_hosts(self.info)
        if self.info.is_main:
            save_config(self.config, self.run_dir / "config.yaml")
            if self.plan.checkpoint is None:
                self.metrics_file.unlink(missing_ok=True)
            else:
                truncate_metrics(self.metrics_file, self.step)
            record = {
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "event": "resume" if self.plan.checkpoint else "start",
                "step": self.step,
                "steps": self.config.train.steps,
                "world_size": self.info.world_size,
                "hosts": hosts,
                "pid": os.getpid(),
                "checkpoint": Path(self.plan.checkpoint).name if self.plan.checkpoint else None,
                "changed": {
                    k: list(v) for k, v in self.plan.changes.items() if k != "train.run_dir"
                },
                "batch_size": self.batch_size,
                "global_batch": self.batch_size * self.info.world_size,
                **_launcher_restarts(),
            }
            if self.plan.world_change is not None:
                record["world_change"] = self.plan.world_change
            append_jsonl(self.run_dir / RESTARTS_NAME, record)
        barrier(self.info)

    def _already_complete(self) -> TrainResult:
        """The run is done: export model/ only if it is missing or not the final weights."""
        model_dir = self.run_dir / "model"
        error = None
        if self.info.is_main:
            assert self.plan.checkpoint is not None
            state = self._state or load_checkpoint(self.plan.checkpoint)
            if "model" not in state:  # a sharded checkpoint's sidecar: read its whole weights
                state = {**state, **read_whole(self.plan.checkpoint, keys={"model", "ema"})}
            weights = state["model"]
            # as the run's end exported: its last checkpoint holds an EMA exactly when the EMA
            # was on then, whatever this re-run's train.ema_decay says
            if "ema" in state:
                weights = with_ema_weights(weights, state["ema"])
            if not _export_matches(model_dir, weights):
                log.info(
                    "model/ is missing or not %s's weights: exporting it", self.plan.checkpoint
                )
                try:
                    export_open_clip(
                        None,
                        state["model_cfg"],
                        model_dir,
                        state.get("preprocess_cfg"),
                        state=weights,
                    )
                except OutOfSpaceError as e:
                    error = str(e)
            self._state = None
        error = broadcast_object(error, self.info)
        if error:
            raise TrainingAborted(error)
        return TrainResult(
            self.run_dir,
            self.step,
            self.samples_seen,
            self.plan.last_loss,
            model_dir if self.info.is_main else None,
            already_complete=True,
        )

    # ------------------------------------------------------------------ step pieces
    def _forward_backward(self, batch: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The step's forward and backward into ``.grad`` (the whole per-rank batch, as
        ``train.accum_steps`` micro-batches), and the mean text positions its captions ran."""
        images = batch["image"].to(self.info.device, non_blocking=True)  # (B, 3, H, W)
        texts = batch["text"].to(self.info.device, non_blocking=True)  # (B, context)
        # per caption, from the host copy: no device sync for a metric
        text_positions = batch_text_positions(unwrap(self.model), batch["text"])
        # Accumulation keeps the whole batch as each caption's negatives (the contrastive loss
        # is not a sum over samples, so micro-batch losses cannot simply be added): see step.py.
        out = forward_backward(
            self.model,
            images,
            texts,
            self.loss_fn,
            accum_steps=self.config.train.accum_steps,
            autocast=self.autocast,
            no_sync=getattr(self.model, "no_sync", None),
            grad_scaler=self.scaler,
            **step_negatives(batch, self.info.device),
        )
        return out, text_positions

    def _clip_gradients(self) -> float:
        """Clip to ``optim.grad_clip`` and return the norm before clipping (inf when off)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        return clip_grad_norm(self.model, self.config.optim.grad_clip or float("inf"))

    def _optimizer_step(self, loss: float, grad_norm: float) -> bool:
        """Apply the gradients, or skip the step where any rank's loss or norm is not finite;
        whether the step was taken (the same on every rank)."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        # every rank must skip the same step, or the replicas' weights would diverge
        taken = all_reduce_max(float(bad), self.info) == 0
        if not taken:
            self._skip_step(loss, grad_norm)
        else:
            self._consecutive_bad = 0
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # None, not 0: no memset, no stale add
        self._clamp_logit_scale()
        return taken

    def _skip_step(self, loss: float, grad_norm: float) -> None:
        """Count a non-finite step; abort after ``train.max_nonfinite`` of them in a row (one
        bad batch is noise, a run of them is a diverged run)."""
        self.nonfinite_steps += 1
        self._consecutive_bad += 1
        log.warning(
            "step %d: non-finite loss %.4g / grad norm %.4g: step skipped",
            self.step + 1,
            loss,
            grad_norm,
        )
        if self._consecutive_bad >= self.config.train.max_nonfinite:
            raise TrainingAborted(
                f"{self._consecutive_bad} consecutive steps with a non-finite loss or "
                f"gradient norm (last: loss {loss}, grad norm {grad_norm}) at "
                f"step {self.step + 1}: lower optim.lr, use precision bf16/fp32, or "
                "check data"
            )
        if self.scaler is not None:
            self.scaler.update()  # lowers the scale: the usual cause of fp16 overflow

    def _clamp_logit_scale(self) -> None:
        """Keep the learned temperature within ``loss.max_logit_scale`` (CLIP's 100): an
        unbounded scale makes the softmax a hard max and training unstable."""
        logit_scale = unwrap(self.model).logit_scale
        assert isinstance(logit_scale, torch.Tensor)  # a Parameter (nn.Module types it loosely)
        with torch.no_grad():
            logit_scale.clamp_(0, self.config.loss.max_logit_scale)

    def _log(self, step_figures: dict[str, Any], lr: float) -> None:
        """One metrics line (every rank joins the loss mean; rank 0 writes)."""
        step_figures["loss"] = all_reduce_mean(step_figures["loss"], self.info)
        if self.hard_negatives is not None:  # every rank's count (each reads its own samples)
            without = self.loader.without_hard_negatives
            world = self.info.world_size
            step_figures["samples_without_hard_negatives"] = round(
                all_reduce_mean(float(without), self.info) * world
            )
        if not self.info.is_main:
            return
        assert self.metrics is not None
        n_dev = self.info.world_size
        record = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            **step_figures,
            "lr": lr,
            "samples_per_s_per_device": round(step_figures["samples_per_s"] / n_dev, 2),
            "skipped_samples": dict(self.loader.skipped),
            "nonfinite_steps": self.nonfinite_steps,
        }
        record.update(
            utilization(
                self.flops,
                step_figures["text_positions"],
                step_figures["samples_per_s"],
                n_dev,
                self.info.device,
            )
        )
        self.metrics.log(record)

    def _evaluate(self) -> None:
        assert self.eval_callback is not None and self.metrics is not None
        # with EMA on, the weights evaluated are those model/ will hold
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            results = self.eval_callback(unwrap(self.model), self.step)
        self.model.train()
        if results:
            record = {"step": self.step, "samples_seen": self.samples_seen}
            self.metrics.log_eval({**record, **{f"eval/{k}": v for k, v in results.items()}})

    def _save_checkpoint(self, loss: float) -> None:
        """Every rank: the step's checkpoint in ``train.checkpoint_format``; an asynchronous
        one is left writing (see :meth:`_finish_pending_save`)."""
        self._finish_pending_save()  # one save in flight at a time
        positions = _gather_positions(self.loader.position, self.info)
        rngs = all_gather_objects(rng_state(), self.info)
        mean_loss = all_reduce_mean(loss, self.info)
        trainer_state = {
            "schedule": schedule_state(self.schedule),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_steps": self.nonfinite_steps,
            "last_loss": mean_loss,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "data_positions": positions,
            "batch_size": self.batch_size,  # per rank (data.batch_size, or derived)
            "global_batch": self.batch_size * self.info.world_size,
            "model_cfg": self.model_cfg,
            "preprocess_cfg": _plain(self.preprocess_cfg),
            "config": self.config.to_dict(),
        }
        if self.ema is not None:  # its presence says the checkpoint holds an EMA
            trainer_state["ema_updates"] = self.ema.updates
        if self.config.train.checkpoint_format == "sharded":
            error = self._save_sharded(trainer_state)
        else:
            error = self._save_whole(trainer_state)
        # instead of a barrier: every rank stops on rank 0's failure, none waits for it
        error = broadcast_object(error, self.info)
        if error:
            raise TrainingAborted(error)

    def _save_whole(self, trainer_state: dict[str, Any]) -> str | None:
        """Gather the whole state on rank 0, which writes ``step-N.pt``; rank 0's error."""
        model_sd, optim_sd = full_state_dicts(self.model, self.optimizer)  # every rank
        # every rank joins the gathers; rank 0 keeps the result
        ema_sd = None if self.ema is None else self.ema.full_state_dict(keep=self.info.is_main)
        if not self.info.is_main:
            return None
        folder = self.run_dir / "checkpoints"
        state = {"model": model_sd, "optimizer": optim_sd, **trainer_state}
        if ema_sd is not None:
            state["ema"] = ema_sd
        try:
            save_checkpoint(folder, self.step, state, keep=self.config.train.keep_checkpoints)
        except OutOfSpaceError as e:
            return f"{e}" + self._resumes_from()
        return None

    def _save_sharded(self, trainer_state: dict[str, Any]) -> str | None:
        """Every rank writes its shards into rank 0's temp directory; rank 0 then writes the
        sidecar and renames it ``step-N`` (at once, or when an asynchronous write completes).
        Returns the error message when the save failed (on any rank: DCP raises on all)."""
        folder = self.run_dir / "checkpoints"
        final = checkpoint_path(folder, self.step, sharded=True)
        tmp = Path(broadcast_object(str(temp_path_for(final)), self.info))  # rank 0's pid
        keep = self.config.train.keep_checkpoints
        sidecar = trainer_state if self.info.is_main else None
        state = model_optimizer_state(unwrap(self.model), self.optimizer)  # every rank
        if self.ema is not None:  # each rank its shards (FSDP2), as the model's
            state["ema"] = self.ema.state_dict()
        try:
            if self.config.train.checkpoint_async:
                future = start_async_save(tmp, state, self._checkpoint_group)
                self._pending_save = PendingSave(
                    future, tmp, final, sidecar, after=lambda: prune_checkpoints(folder, keep)
                )
                return None
            save_shards(tmp, state, self._checkpoint_group)
            if sidecar is not None:
                publish(tmp, final, sidecar)
                prune_checkpoints(folder, keep)
        except Exception as e:
            return self._sharded_save_failed(final, tmp, e)
        return None

    def _finish_pending_save(self) -> None:
        """Wait for an asynchronous save still writing (every rank); abort on its failure."""
        pending, self._pending_save = getattr(self, "_pending_save", None), None
        if pending is None:
            return
        error = None
        try:
            pending.wait()
        except Exception as e:
            error = self._sharded_save_failed(pending.final, pending.tmp, e)
        errors = [e for e in all_gather_objects(error, self.info) if e]
        if errors:
            raise TrainingAborted(errors[0])

    def _sharded_save_failed(self, final: Path, tmp: Path, e: BaseException) -> str:
        if self.info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        return (
            f"writing the sharded checkpoint {final} failed ({type(e).__name__}: {e})"
            + self._resumes_from()
        )

    def _resumes_from(self) -> str:
        newest = latest_checkpoint(self.run_dir / "checkpoints")
        if newest is None:
            return ""
        return f" (the run resumes from {newest.name}, the newest complete checkpoint)"

    def _export(self) -> Path | None:
        out, error = None, None
        weights = full_model_state_dict(self.model)  # every rank (whole on rank 0 only)
        # every rank joins the gathers; rank 0 keeps the result
        ema = self.ema.full_state_dict(keep=self.info.is_main) if self.ema is not None else None
        if self.info.is_main:
            if ema is not None:  # model/ holds the EMA weights; the checkpoints keep the raw
                weights = with_ema_weights(weights, ema)
            try:
                out = export_open_clip(
                    unwrap(self.model),
                    self.model_cfg,
                    self.run_dir / "model",
                    self.preprocess_cfg,
                    state=weights,
                )
            except OutOfSpaceError as e:
                error = str(e)
        error = broadcast_object(error, self.info)
        if error:
            raise TrainingAborted(error)
        return out


CRASH_ENV = "CLIPFORGE_TEST_CRASH_ONCE"
"""Tests only: ``RANK:STEP:MARKER_FILE`` makes that rank's process ``os._exit(1)`` after that
step, once (the marker file records that it happened), as a lost node would."""


def _crash_once_if_asked(step: int, rank: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    crash_rank, crash_step, marker = spec.split(":", 2)
    if (int(crash_rank), int(crash_step)) != (rank, step) or os.path.exists(marker):
        return
    Path(marker).write_text(f"rank {rank} exited after step {step}\n")
    log.warning("%s: rank %d exits after step %d", CRASH_ENV, rank, step)
    os._exit(1)


def _launcher_restarts() -> dict[str, int]:
    """How many times the launcher restarted this job (torchrun's elastic agent, SLURM's
    requeue), as it tells its processes."""
    found = {}
    for key, env in (("torchrun_restarts", "TORCHELASTIC_RESTART_COUNT"),
                     ("slurm_restarts", "SLURM_RESTART_COUNT")):  # fmt: skip
        value = os.environ.get(env, "")
        if value.isdigit():
            found[key] = int(value)
    return found


def _export_matches(model_dir: Path, weights: dict[str, torch.Tensor]) -> bool:
    """``model_dir`` holds an export of exactly ``weights``."""
    from clipforge.pretrain.models import OPEN_CLIP_CONFIG_NAME, OPEN_CLIP_WEIGHTS_NAME

    file = model_dir / OPEN_CLIP_WEIGHTS_NAME
    if not (file.is_file() and (model_dir / OPEN_CLIP_CONFIG_NAME).is_file()):
        return False
    try:
        exported = torch.load(file, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return exported.keys() == weights.keys() and all(
        torch.equal(exported[k], weights[k]) for k in weights
    )


def _gather_hosts(info: DistInfo) -> list[str]:
    """The hosts of the job, in rank order, each once."""
    host = socket.gethostname()
    if not info.distributed:
        return [host]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, host)
    return list(dict.fromkeys(out))


def _gather_positions(position: StreamPosition, info: DistInfo) -> list[dict[str, Any]]:
    mine = position.to_dict()
    if not info.distributed:
        return [mine]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, mine)
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


__all__ = ["EvalCallback", "TrainResult", "Trainer", "TrainingAborted", "train"]
