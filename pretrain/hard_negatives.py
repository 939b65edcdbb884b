"""Training with mined hard negatives (``data.hard_negatives``): reading the file for the loader
and handing each batch's negatives to the step.

The file contract is :mod:`clipforge.data_tools.hard_negatives`; the loss side is in
:mod:`clipforge.pretrain.losses` (extra image->text columns) and :mod:`clipforge.pretrain.step`
(the negatives go through the text tower in the captions' forward).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from clipforge.data_tools.hard_negatives import HardNegativeBatcher, HardNegativesError
from clipforge.pretrain.config import ConfigError, DataConfig

log = logging.getLogger(__name__)


def load_hard_negatives(data: DataConfig, log_it: bool = True) -> HardNegativeBatcher | None:
    """The batcher of ``data.hard_negatives`` (None when unset); a missing or malformed file is
    a :class:`ConfigError` naming the key, the file and what is wrong."""
    if not data.hard_negatives:
        return None
    try:
        batcher = HardNegativeBatcher.from_file(data.hard_negatives, data.hard_negatives_per_sample)
    except (HardNegativesError, FileNotFoundError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.hard_negatives: {e}") from None
    except OSError as e:  # unreadable
        raise ConfigError(
            f"data.hard_negatives: cannot read {data.hard_negatives}: {e.strerror or e}"
        ) from None
    if log_it:
        with_any = sum(1 for v in batcher.table.values() if v)
        log.info(
            "hard negatives: %d of %d samples in %s have some; using up to %d per sample",
            with_any,
            len(batcher.table),
            data.hard_negatives,
            data.hard_negatives_per_sample,
        )
    return batcher


def step_negatives(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """``forward_backward``'s ``negatives`` (B, k, L) and ``negative_mask`` (B, k) of a loader
    batch, on ``device``; empty when the batch carries none."""
    if "hard_negatives" not in batch:
        return {}
    return {
        "negatives": batch["hard_negatives"].to(device, non_blocking=True),
        "negative_mask": batch["hard_negatives_mask"].to(device, non_blocking=True),
    }
