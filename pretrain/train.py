"""The training loop: :func:`train` sets up, :meth:`Trainer.train` reads top to bottom.

Everything is counted in optimizer steps and samples seen. Rank 0 writes; every rank computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from clipforge.pretrain.config import Config, ConfigError, save_config
from clipforge.pretrain.cpu_memory import keep_freed_memory
from clipforge.pretrain.distributed import (
    DistInfo,
    all_reduce_max,
    all_reduce_mean,
    barrier,
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
from clipforge.pretrain.step import forward_backward

log = logging.getLogger(__name__)

EvalCallback = Callable[[nn.Module, int], dict[str, float]]
"""(model, step) -> metrics: called every ``train.eval_every`` steps on every rank."""

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


def train(config: Config, eval_callback: EvalCallback | None = None) -> TrainResult:
    """Run (or resume) training as configured; returns when ``train.steps`` are done."""
    info = init_distributed(config.train.device)
    try:
        return Trainer(config, info, eval_callback).train()
    finally:
        shutdown(info)


def resolve_eval_callback(name: str) -> EvalCallback:
    """An evaluation callback registered by another package under ``clipforge.eval_callbacks``."""
    found = {ep.name: ep for ep in entry_points(group=EVAL_CALLBACK_GROUP)}
    if name not in found:
        raise ConfigError(
            f"train.eval_callback {name!r} is not registered (known: {sorted(found) or 'none'})"
        )
    return found[name].load()


class Trainer:
    """Holds the model, optimizer, data and counters of one run."""

    def __init__(
        self, config: Config, info: DistInfo, eval_callback: EvalCallback | None = None
    ) -> None:
        self.config, self.info = config, info
        tc = config.train
        self.run_dir = Path(tc.run_dir)
        self._preflight()
        if eval_callback is None and tc.eval_callback:
            eval_callback = resolve_eval_callback(tc.eval_callback)
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
        self.model = parallelize(model, config.model, info)
        self.loss_fn = make_loss(config.loss.kind)
        self.optimizer = _make_optimizer(unwrap(self.model), config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(config))
        dev_type = info.device.type
        self.scaler = torch.amp.GradScaler(dev_type) if tc.precision == "fp16" else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.autocast = (
            (lambda: torch.autocast(dev_type, dtype=dtype)) if dtype else (contextlib.nullcontext)
        )
        self.step = 0
        self.samples_seen = 0
        self.nonfinite_steps = 0
        position = self._resume()
        self.loader = self._make_loader(position)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.tb = self._tensorboard() if tc.tensorboard and info.is_main else None

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        tc = self.config.train
        global_batch = self.config.data.batch_size * self.info.world_size
        batches = self._batches()
        consecutive_bad = 0
        window = _Window()
        progress = self._progress()
        loss_value = float("nan")
        while self.step < tc.steps:
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
                        f"{consecutive_bad} consecutive steps with a non-finite loss or gradient "
                        f"norm (last: loss {loss_value}, grad norm {grad_norm}) at step "
                        f"{self.step + 1}: lower optim.lr, use precision bf16/fp32, or check data"
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
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            self.scheduler.step()
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
                self._save_checkpoint()
        model_dir = self._export()
        return TrainResult(self.run_dir, self.step, self.samples_seen, loss_value, model_dir)

    # ------------------------------------------------------------------ setup pieces
    def _preflight(self) -> None:
        """Fail before the first step, with a clear message, on what would fail later."""
        cfg, info = self.config, self.info
        if not cfg.data.train:
            raise ConfigError(
                "data.train is empty: give the training shards (--set data.train=PATH_OR_PATTERN)"
            )
        sources = parse_shard_spec(cfg.data.train)
        if not cfg.data.resampled:
            check_exact_pass(sum(len(s.urls) for s in sources), info.world_size, cfg.data.workers)
        if info.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                probe = self.run_dir / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise ConfigError(f"train.run_dir {self.run_dir} is not writable ({e})") from None
            save_config(cfg, self.run_dir / "config.yaml")
        barrier(info)
        if cfg.train.precision == "fp16" and info.device.type == "cpu":
            log.warning("fp16 autocast on CPU is slow and rarely useful; bf16 is the CPU choice")

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
        ckpt_path = latest_checkpoint(self.run_dir / "checkpoints")
        if not (self.config.train.resume and ckpt_path is not None):
            if self.info.is_main:
                (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return StreamPosition()
        state = load_checkpoint(ckpt_path)
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.samples_seen = state["step"], state["samples_seen"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        set_rng_state(state["rng"])
        if self.info.is_main:
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)
            log.info(
                "resumed from %s (step %d, %d samples seen)",
                ckpt_path,
                self.step,
                self.samples_seen,
            )
        positions = state["data_positions"]
        if len(positions) != self.info.world_size:
            raise ConfigError(
                f"{ckpt_path} was written by {len(positions)} ranks; resuming "
                f"with {self.info.world_size} would not continue the same data"
            )
        p = positions[self.info.rank]
        return StreamPosition(p["epoch"], tuple(p["consumed"]), p["next_worker"])

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
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
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
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(
                    json.dumps(
                        {
                            "step": self.step,
                            "samples_seen": self.samples_seen,
                            **{f"eval/{k}": v for k, v in results.items()},
                        }
                    )
                    + "\n"
                )

    def _save_checkpoint(self) -> None:
        positions = _gather_positions(self.loader.position, self.info)
        model_sd, optim_sd = full_state_dicts(self.model, self.optimizer)  # every rank
        if self.info.is_main:
            state = {
                "model": model_sd,
                "optimizer": optim_sd,
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step,
                "samples_seen": self.samples_seen,
                "nonfinite_steps": self.nonfinite_steps,
                "rng": rng_state(),
                "data_positions": positions,
                "model_cfg": self.model_cfg,
                "preprocess_cfg": _plain(self.preprocess_cfg),
                "config": self.config.to_dict(),
            }
            save_checkpoint(
                self.run_dir / "checkpoints",
                self.step,
                state,
                keep=self.config.train.keep_checkpoints,
            )
        barrier(self.info)

    def _export(self) -> Path | None:
        out = None
        weights = full_model_state_dict(self.model)  # every rank
        if self.info.is_main:
            out = export_open_clip(
                unwrap(self.model),
                self.model_cfg,
                self.run_dir / "model",
                self.preprocess_cfg,
                state=weights,
            )
        barrier(self.info)
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


def _lr_lambda(config: Config) -> Callable[[int], float]:
    oc, steps = config.optim, config.train.steps

    def factor(step: int) -> float:
        if step < oc.warmup_steps:
            return (step + 1) / oc.warmup_steps
        if oc.schedule == "constant":
            return 1.0
        progress = (step - oc.warmup_steps) / max(1, steps - oc.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return oc.min_lr_ratio + (1 - oc.min_lr_ratio) * cosine

    return factor


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


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics lines past ``step`` (written by a run killed after its last checkpoint)."""
    if not path.exists():
        return
    from clipforge.data_tools.atomic import write_bytes_atomic

    kept = [
        line
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_bytes_atomic(path, ("\n".join(kept) + "\n" if kept else "").encode())


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


__all__ = ["EvalCallback", "TrainResult", "Trainer", "TrainingAborted", "train"]
