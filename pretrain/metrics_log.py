"""Where a run's metrics go: ``metrics.jsonl``, TensorBoard when asked for, and the console.

One :class:`MetricsLog` per run, on rank 0 only (the other ranks get a :class:`MetricsLog` that
is switched off, so the loop calls it the same way everywhere). ``metrics.jsonl`` is the record
every tool reads (``clipforge-eval plot``, resume's loss lookup); TensorBoard gets the same
numbers as scalars; the console gets a progress bar on a terminal, else one line per log step.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from clipforge.pretrain.config import ConfigError
from clipforge.pretrain.rundir import append_jsonl

ProgressMode = Literal["auto", "bar", "lines"]


class MetricsLog:
    """The sinks of one run's metrics (all three behind one ``log`` call)."""

    def __init__(
        self,
        metrics_file: Path,
        *,
        total_steps: int,
        enabled: bool,
        tensorboard_dir: Path | None = None,
        progress: ProgressMode = "auto",
    ) -> None:
        """``enabled``: this process writes (rank 0); ``tensorboard_dir``: also write event files
        there (raises :class:`ConfigError` when the ``tensorboard`` package is missing);
        ``progress``: ``bar`` (a tqdm bar), ``lines`` (a line per log step) or ``auto`` (a bar
        when stdout is a terminal)."""
        self.metrics_file = metrics_file
        self.total_steps = total_steps
        self.enabled = enabled
        self.progress_mode = progress
        self._tb = _summary_writer(tensorboard_dir) if enabled and tensorboard_dir else None
        self._bar: Any = None

    def start_progress(self, step: int) -> None:
        """Show the progress bar from ``step`` on, where the mode and the terminal ask for one."""
        interactive = (
            sys.stdout.isatty() if self.progress_mode == "auto" else (self.progress_mode == "bar")
        )
        if not (interactive and self.enabled):
            return
        from tqdm import tqdm

        self._bar = tqdm(total=self.total_steps, initial=step, unit="step", dynamic_ncols=True)

    def progress(self, step: int, loss: float) -> None:
        """Move the bar to ``step`` (every step; a no-op without a bar)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{loss:.4f}")

    def log(self, record: dict[str, Any]) -> None:
        """One training log line: ``metrics.jsonl``, TensorBoard's numeric scalars, and (without a
        bar) a console line. ``record`` holds at least step, loss, lr, temperature,
        samples_per_s and data_wait_frac."""
        if not self.enabled:
            return
        append_jsonl(self.metrics_file, record)
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])
        if self._bar is None:
            print(
                f"step {record['step']}/{self.total_steps} loss {record['loss']:.4f} "
                f"lr {record['lr']:.2e} T {record['temperature']:.4f} "
                f"{record['samples_per_s']:.1f} samples/s "
                f"data-wait {record['data_wait_frac']:.0%}",
                flush=True,
            )

    def log_eval(self, record: dict[str, Any]) -> None:
        """An evaluation's figures (already ``eval/``-prefixed, with step and samples_seen): to
        ``metrics.jsonl`` only, as their own line."""
        if self.enabled:
            append_jsonl(self.metrics_file, record)

    def close(self) -> None:
        """Flush and close the bar and the event files; idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard=true needs the tensorboard package (pip install tensorboard)"
        ) from None
    return SummaryWriter(str(folder))


__all__ = ["MetricsLog", "ProgressMode"]
