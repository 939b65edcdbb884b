"""The training loop: :func:`train` sets up, :meth:`Trainer.train` reads top to bottom.

Everything is counted in optimizer steps and samples seen. Rank 0 writes; every rank computes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipforge.data_tools.atomic import OutOfSpaceError
from clipforge.data_tools.reader import (
    ReaderConfig,
    ShardLoader,
    StreamPosition,
    check_exact_pass,
    make_loader,
    parse_shard_spec,
)
from clipforge.data_tools.transforms import CaptionPartsSubset, clip_image_transforms
from clipforge.pretrain.checkpoint import (
    NoIntactCheckpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_newest_intact,
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
from clipforge.pretrain.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_object,
    init_distributed,
    shutdown,
)
from clipforge.pretrain.losses import make_loss
from clipforge.pretrain.models import build_model, export_open_clip, load_tokenizer
from clipforge.pretrain.parallelize import (
    clip_grad_norm,
    full_model_state_dict,
    full_state_dicts,
    load_full_state_dicts,
    parallelize,
    unwrap,
)
from clipforge.pretrain.pooled_forward import batch_text_positions, full_context_tokens
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
    Segment,
    extend,
    initial_schedule,
    lr_at,
    schedule_from_state,
    schedule_state,
)
from clipforge.pretrain.step import forward_backward

log = logging.getLogger(__name__)

EvalCallback = Callable[[nn.Module, int], dict[str, float]]
"""(model, step) -> metrics: called every ``train.eval_every`` steps on every rank."""

EvalCallbackFactory = Callable[[Config], EvalCallback]
"""What a ``clipforge.eval_callbacks`` entry point is: called once per rank with the run config
(whose ``train.eval`` sets it evaluates) before the first step; returns the callback."""

EVAL_CALLBACK_GROUP = "clipforge.eval_callbacks"

# Dense bf16 peak FLOP/s per GPU, for the MFU estimate (matched on the device name).
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


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
    info = init_distributed(config.train.device)
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
    samples_seen: int
    complete: bool
    """The checkpoint is at or past ``train.steps``: nothing to train, nothing to change."""
    schedule: list[dict[str, Any]]
    changes: dict[str, tuple[Any, Any]]
    """Settings that differ from the checkpoint's (all allowed on resume)."""
    last_loss: float = float("nan")


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
        self._state: dict[str, Any] | None = None  # rank 0: the checkpoint read while planning
        try:
            self._setup(eval_callback)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give up the run directory's lock (rank 0); idempotent."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _setup(self, eval_callback: EvalCallback | None) -> None:
        config, info, tc = self.config, self.info, self.config.train
        self._preflight()
        self.plan = self._make_plan()
        self.step, self.samples_seen = self.plan.step, self.plan.samples_seen
        if self.plan.complete:  # nothing is built: train() only reports (and exports if need be)
            return
        if eval_callback is None and tc.eval_callback:
            eval_callback = resolve_eval_callback(tc.eval_callback)(config)
        self.eval_callback = eval_callback

        if info.device.type == "cpu":
            keep_freed_memory()  # activations reused, not page-faulted in every step
        torch.manual_seed(tc.seed)
        siglip = config.loss.kind == "siglip"
        model, self.model_cfg = build_model(
            config.model,
            siglip=siglip,
            init_logit_scale=config.loss.init_logit_scale,
            init_logit_bias=config.loss.init_logit_bias,
        )
        self.preprocess_cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
        self.flops = _count_flops_per_sample(model, self.model_cfg)
        # FSDP all-gathers parameters in bf16 under bf16 autocast (half the bytes; the compute
        # is bf16 anyway) and reduces gradients in float32 (see parallelize).
        fsdp_bf16 = config.model.fsdp and config.train.precision == "bf16"
        self.model = parallelize(
            model, config.model, info, param_dtype=torch.bfloat16 if fsdp_bf16 else None
        )
        self.loss_fn = make_loss(config.loss.kind)
        self.optimizer = _make_optimizer(unwrap(self.model), config)
        self.schedule: Schedule = schedule_from_state(self.plan.schedule)
        dev_type = info.device.type
        self.scaler = torch.amp.GradScaler(dev_type) if tc.precision == "fp16" else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.autocast = (
            (lambda: torch.autocast(dev_type, dtype=dtype)) if dtype else (contextlib.nullcontext)
        )
        self.nonfinite_steps = 0
        position = self._resume()
        self._record_start()
        self.loader = self._make_loader(position)
        self.tb = self._tensorboard() if tc.tensorboard and info.is_main else None

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        tc = self.config.train
        if self.plan.complete:
            return self._already_complete()
        global_batch = self.config.data.batch_size * self.info.world_size
        batches = self._batches()
        consecutive_bad = 0
        window = _Window()
        progress = self._progress()
        loss_value = float("nan")
        try:
            while self.step < tc.steps:
                lr = lr_at(self.schedule, self.step)  # the rate this step uses
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                t0 = time.perf_counter()
                batch = next(batches)
                t_data = time.perf_counter() - t0
                images = batch["image"].to(self.info.device, non_blocking=True)  # (B, 3, H, W)
                texts = batch["text"].to(self.info.device, non_blocking=True)  # (B, context)
                # per caption, from the host copy: no device sync for a metric
                text_positions = batch_text_positions(unwrap(self.model), batch["text"])
                out = forward_backward(
                    self.model,
                    images,
                    texts,
                    self.loss_fn,
                    accum_steps=tc.accum_steps,
                    autocast=self.autocast,
                    no_sync=getattr(self.model, "no_sync", None),
                    grad_scaler=self.scaler,
                )
                loss_value = float(out["loss"])
                grad_norm = self._clip_gradients()
                bad = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
                if all_reduce_max(float(bad), self.info) > 0:  # every rank skips the same step
                    self.nonfinite_steps += 1
                    consecutive_bad += 1
                    log.warning(
                        "step %d: non-finite loss %.4g / grad norm %.4g: step skipped",
                        self.step + 1,
                        loss_value,
                        grad_norm,
                    )
                    if consecutive_bad >= tc.max_nonfinite:
                        raise TrainingAborted(
                            f"{consecutive_bad} consecutive steps with a non-finite loss or "
                            f"gradient norm (last: loss {loss_value}, grad norm {grad_norm}) at "
                            f"step {self.step + 1}: lower optim.lr, use precision bf16/fp32, or "
                            "check data"
                        )
                    if self.scaler is not None:
                        self.scaler.update()
                else:
                    consecutive_bad = 0
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._clamp_logit_scale()
                self.step += 1
                self.samples_seen += global_batch
                window.add(global_batch, t_data, time.perf_counter() - t0, text_positions)
                progress(self.step, loss_value)
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log(window.flush(loss_value, out["logit_scale"], grad_norm), lr)
                if self.eval_callback and tc.eval_every and self.step % tc.eval_every == 0:
                    self._evaluate()
                if self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                    self._save_checkpoint(loss_value)
        finally:
            batches.close()  # the data workers stop now, also when a step fails
        model_dir = self._export()
        return TrainResult(self.run_dir, self.step, self.samples_seen, loss_value, model_dir)

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
        plan, error = broadcast_object((plan, error), self.info)  # type: ignore[misc]
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
        removed = [
            p
            for folder in (self.run_dir, ckpt_dir, self.run_dir / "model")
            for p in remove_temp_files(folder)
        ]
        if removed:
            log.info(
                "removed %d temp file(s) left by an interrupted write: %s",
                len(removed),
                ", ".join(str(p.relative_to(self.run_dir)) for p in removed),
            )
        fresh = _Plan(None, 0, 0, False, schedule_state(initial_schedule(cfg)), {})
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
        positions = state["data_positions"]
        if len(positions) != self.info.world_size:
            raise ConfigError(
                f"{path} was written by {len(positions)} ranks; resuming "
                f"with {self.info.world_size} would not continue the same data"
            )
        saved = state.get("config") if isinstance(state.get("config"), dict) else {}
        if not saved:
            log.warning("%s records no config: the resume cannot check its settings", path)
        diffs = config_differences(saved, cfg) if saved else {}
        refused = {k: v for k, v in diffs.items() if k not in RESUME_MUTABLE}
        if refused:
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
            raise ConfigError(
                f"cannot resume {path} with different settings ({listed}): they change what "
                "the checkpoint holds or the data it continues; set them back, or use another "
                "train.run_dir (settings a resume may change: see the README's pretrain section)"
            )
        step, samples_seen = int(state["step"]), int(state["samples_seen"])
        self._state = state
        if step >= tc.steps:
            loss = last_logged_loss(self.metrics_file, step)
            if loss is None:
                loss = float(state.get("last_loss", float("nan")))
            return _Plan(str(path), step, samples_seen, True, [], diffs, loss)
        if "schedule" in state:
            schedule = schedule_from_state(state["schedule"])
        else:  # written before schedules were stored: the one its own config described
            schedule = _first_schedule(saved, cfg)
        schedule_changes = {k: v for k, v in diffs.items() if k in SCHEDULE_KEYS}
        if schedule_changes:
            listed = ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in schedule_changes.items()
            )
            current = lr_at(schedule, step)
            last = schedule[-1]
            # a constant rate past its warmup has no decay to restart: it just goes on
            constant_goes_on = (
                set(schedule_changes) == {"train.steps"}
                and last.kind == "constant"
                and step - last.start >= last.warmup_steps
            )
            if constant_goes_on and not tc.extend_schedule:
                schedule = [*schedule[:-1], dataclasses.replace(last, end=tc.steps)]
                log.info("%s: the constant rate %.3g goes on to the new end", listed, current)
            elif not tc.extend_schedule:
                raise ConfigError(
                    f"resuming {path} at step {step} with {listed} changes the learning-rate "
                    f"schedule (the next step's rate is {current:.3g}): say how it continues, "
                    "--set train.extend_schedule=rewarm (warm up from it to optim.lr over "
                    "optim.warmup_steps steps, then decay to the new end) or "
                    "--set train.extend_schedule=continue_lr (decay from it to the new end)"
                )
            else:
                schedule = extend(schedule, step, cfg, tc.extend_schedule)
                log.info(
                    "schedule changed at step %d (%s) by train.extend_schedule=%s: %s",
                    step,
                    listed,
                    tc.extend_schedule,
                    schedule[-1].describe(),
                )
        for key, (old, new) in diffs.items():
            if key not in SCHEDULE_KEYS and key != "train.extend_schedule":
                log.info("resume changes %s: %r -> %r", key, old, new)
        return _Plan(str(path), step, samples_seen, False, schedule_state(schedule), diffs)

    def _make_loader(self, position: StreamPosition) -> ShardLoader:
        cfg = self.config
        size = self.preprocess_cfg.get("size", self.model_cfg["vision_cfg"]["image_size"])
        size = size[0] if isinstance(size, (list, tuple)) else size
        per_sample, per_batch = clip_image_transforms(
            int(size),
            train=cfg.data.augment,
            mean=self.preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073)),
            std=self.preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711)),
        )
        tokenizer = load_tokenizer(cfg.model.name)
        # drop_last: every rank's batch must have the same size for the gathered loss.
        reader = ReaderConfig(
            batch_size=cfg.data.batch_size,
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
                CaptionPartsSubset(cfg.data.caption_subsets) if cfg.data.caption_subsets else None
            ),
        )

    def _batches(self) -> Iterator[dict[str, Any]]:
        """Endless batches: a new exact pass starts when one ends."""
        while True:
            empty = True
            for batch in self.loader:
                empty = False
                yield batch
            if empty:
                raise TrainingAborted(
                    f"data.train {self.config.data.train!r} yielded no "
                    f"samples on rank {self.info.rank} (skipped: "
                    f"{dict(self.loader.skipped)})"
                )

    def _resume(self) -> StreamPosition:
        """Load the planned checkpoint (every rank) and return this rank's data position."""
        if self.plan.checkpoint is None:
            return StreamPosition()
        state = self._state if self._state is not None else load_checkpoint(self.plan.checkpoint)
        self._state = None  # not kept for the whole run
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        set_rng_state(state["rng"])
        if self.info.is_main:
            log.info(
                "resumed from %s (step %d, %d samples seen)",
                self.plan.checkpoint,
                self.step,
                self.samples_seen,
            )
        p = state["data_positions"][self.info.rank]
        return StreamPosition(p["epoch"], tuple(p["consumed"]), p["next_worker"])

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
                "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
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
            }
            append_jsonl(self.run_dir / RESTARTS_NAME, record)
        barrier(self.info)

    def _already_complete(self) -> TrainResult:
        """The run is done: export model/ only if it is missing or not the final weights."""
        model_dir = self.run_dir / "model"
        error = None
        if self.info.is_main:
            assert self.plan.checkpoint is not None
            state = self._state or load_checkpoint(self.plan.checkpoint)
            if not _export_matches(model_dir, state["model"]):
                log.info(
                    "model/ is missing or not %s's weights: exporting it", self.plan.checkpoint
                )
                try:
                    export_open_clip(
                        None,
                        state["model_cfg"],
                        model_dir,
                        state.get("preprocess_cfg"),
                        state=state["model"],
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
    def _clip_gradients(self) -> float:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        return clip_grad_norm(self.model, self.config.optim.grad_clip or float("inf"))

    def _clamp_logit_scale(self) -> None:
        with torch.no_grad():
            unwrap(self.model).logit_scale.clamp_(0, self.config.loss.max_logit_scale)

    def _log(self, metrics: dict[str, Any], lr: float) -> None:
        metrics["loss"] = all_reduce_mean(metrics["loss"], self.info)
        if not self.info.is_main:
            return
        n_dev = self.info.world_size
        record = {
            "step": self.step,
            "samples_seen": self.samples_seen,
            **metrics,
            "lr": lr,
            "samples_per_s_per_device": round(metrics["samples_per_s"] / n_dev, 2),
            "skipped_samples": dict(self.loader.skipped),
            "nonfinite_steps": self.nonfinite_steps,
        }
        if self.flops:
            image_flops, text_flops_per_position = self.flops
            per_sample = image_flops + text_flops_per_position * metrics["text_positions"]
            achieved = per_sample * metrics["samples_per_s"] / n_dev
            record["tflops_per_device"] = round(achieved / 1e12, 3)
            peak = _peak_flops(self.info.device)
            if peak:
                record["mfu"] = round(achieved / peak, 4)
        append_jsonl(self.metrics_file, record)
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, self.step)
        if not self._bar:
            print(
                f"step {self.step}/{self.config.train.steps} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} T {record['temperature']:.4f} "
                f"{record['samples_per_s']:.1f} samples/s "
                f"data-wait {record['data_wait_frac']:.0%}",
                flush=True,
            )

    def _evaluate(self) -> None:
        assert self.eval_callback is not None
        results = self.eval_callback(unwrap(self.model), self.step)
        self.model.train()
        if self.info.is_main and results:
            record = {"step": self.step, "samples_seen": self.samples_seen}
            append_jsonl(
                self.metrics_file, {**record, **{f"eval/{k}": v for k, v in results.items()}}
            )

    def _save_checkpoint(self, loss: float) -> None:
        positions = _gather_positions(self.loader.position, self.info)
        model_sd, optim_sd = full_state_dicts(self.model, self.optimizer)  # every rank
        mean_loss = all_reduce_mean(loss, self.info)
        error = None
        if self.info.is_main:
            state = {
                "model": model_sd,
                "optimizer": optim_sd,
                "schedule": schedule_state(self.schedule),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "samples_seen": self.samples_seen,
                "nonfinite_steps": self.nonfinite_steps,
                "last_loss": mean_loss,
                "rng": rng_state(),
                "data_positions": positions,
                "model_cfg": self.model_cfg,
                "preprocess_cfg": _plain(self.preprocess_cfg),
                "config": self.config.to_dict(),
            }
            folder = self.run_dir / "checkpoints"
            try:
                save_checkpoint(folder, self.step, state, keep=self.config.train.keep_checkpoints)
            except OutOfSpaceError as e:
                newest = latest_checkpoint(folder)
                error = f"{e}" + (
                    f" (the run resumes from {newest.name}, the newest complete checkpoint)"
                    if newest
                    else ""
                )
        # instead of a barrier: every rank stops on rank 0's failure, none waits for it
        error = broadcast_object(error, self.info)
        if error:
            raise TrainingAborted(error)

    def _export(self) -> Path | None:
        out, error = None, None
        weights = full_model_state_dict(self.model)  # every rank
        if self.info.is_main:
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

    # ------------------------------------------------------------------ display
    _bar = None

    def _progress(self) -> Callable[[int, float], None]:
        mode = self.config.train.progress
        interactive = sys.stdout.isatty() if mode == "auto" else mode == "bar"
        if not (interactive and self.info.is_main):
            return lambda step, loss: None
        from tqdm import tqdm

        self._bar = tqdm(
            total=self.config.train.steps, initial=self.step, unit="step", dynamic_ncols=True
        )

        def update(step: int, loss: float) -> None:
            assert self._bar is not None
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}")

        return update

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
            ) from None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


class _Window:
    """Throughput and data-wait over the steps since the last log line."""

    def __init__(self) -> None:
        self.samples = 0
        self.data_s = 0.0
        self.total_s = 0.0
        self.text_positions = 0.0
        self.steps = 0

    def add(self, samples: int, data_s: float, total_s: float, text_positions: float) -> None:
        self.samples += samples
        self.data_s += data_s
        self.total_s += total_s
        self.text_positions += text_positions
        self.steps += 1

    def flush(self, loss: float, logit_scale: float, grad_norm: float) -> dict[str, Any]:
        out = {
            "loss": loss,
            "logit_scale": round(float(logit_scale), 4),
            "temperature": round(1.0 / float(logit_scale), 5) if logit_scale else float("nan"),
            "grad_norm": round(grad_norm, 4),
            "samples_per_s": round(self.samples / self.total_s, 2) if self.total_s else 0.0,
            "data_wait_frac": round(self.data_s / self.total_s, 4) if self.total_s else 0.0,
            "text_positions": round(self.text_positions / self.steps, 2) if self.steps else 0.0,
        }
        self.__init__()  # type: ignore[misc]
        return out


def _make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms, scalars (logit scale/bias) and embeddings' gains."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = (
            p.ndim < 2 or "logit_" in name or ".ln" in name or "bn" in name or ("bias" in name)
        )
        (no_decay if exclude else decay).append(p)
    oc = config.optim
    groups = [
        {"params": decay, "weight_decay": oc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = oc.fused and not config.model.fsdp
    return torch.optim.AdamW(
        groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=fused or None
    )


def _first_schedule(saved: dict[str, Any], config: Config) -> Schedule:
    """The schedule a checkpoint written before schedules were stored followed: its config's."""
    optim, steps = saved.get("optim", {}), saved.get("train", {}).get("steps", config.train.steps)
    oc = config.optim
    return [
        Segment(
            start=0,
            end=int(steps),
            peak_lr=float(optim.get("lr", oc.lr)),
            warmup_steps=int(optim.get("warmup_steps", oc.warmup_steps)),
            kind=optim.get("schedule", oc.schedule),
            min_ratio=float(optim.get("min_lr_ratio", oc.min_lr_ratio)),
        )
    ]


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


def _count_flops_per_sample(model: nn.Module, model_cfg: dict[str, Any]) -> tuple[float, float]:
    """(image FLOPs per sample, text FLOPs per sample per text position) of forward + backward,
    counted once on a 2-sample batch, backward taken as 2x forward (an estimate for MFU; frozen
    towers make the true figure lower). The text tower is counted over the whole context and
    scaled by the positions each step actually runs (text trimming), linearly: attention's
    quadratic term is < L / (12 x width) of the tower."""
    from torch.utils.flop_counter import FlopCounterMode

    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    ctx = model_cfg["text_cfg"].get("context_length", 77)
    images = torch.zeros(2, 3, size, size)
    texts = full_context_tokens(model, 2, ctx)  # the pooled token last: the whole context runs
    image_counter, text_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with torch.no_grad():
        with image_counter:
            model.encode_image(images)
        with text_counter:
            model.encode_text(texts)
    return 3 * image_counter.get_total_flops() / 2, 3 * text_counter.get_total_flops() / 2 / ctx


def _peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def _gather_positions(position: StreamPosition, info: DistInfo) -> list[dict[str, Any]]:
    mine = {
        "epoch": position.epoch,
        "consumed": list(position.consumed),
        "next_worker": position.next_worker,
    }
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
