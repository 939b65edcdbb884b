"""``clipforge-pretrain``: train a dual encoder from a preset or YAML config.

clipforge-pretrain --config tiny --set data.train=demo-data --set train.steps=200
torchrun --nproc-per-node 8 -m clipforge.pretrain --config vit-b-32 --set data.train=...
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from clipforge.data_tools.reader import ShardSpecError
from clipforge.pretrain.config import PRESETS, ConfigError, describe_fields, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipforge-pretrain",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(PRESETS)}; every key: --help-config",
    )
    parser.add_argument(
        "--config", default="tiny", help="preset name or YAML file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="list every config key with its default and meaning",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    if args.help_config:
        print(describe_fields())
        return 0
    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(config.to_dict(), sort_keys=False))
            return 0
        from clipforge.pretrain.train import TrainingAborted, train

        try:
            result = train(config)
        except TrainingAborted as e:
            print(f"clipforge-pretrain: training aborted: {e}", file=sys.stderr)
            return 3
    except (ConfigError, ShardSpecError, FileNotFoundError) as e:
        print(f"clipforge-pretrain: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk outside a checkpoint write (metrics, config): one line, like the others
        print(f"clipforge-pretrain: training aborted: {e}", file=sys.stderr)
        return 3
    if result.already_complete:
        if result.model_dir is not None:
            loss = f"{result.last_loss:.4f}" if result.last_loss == result.last_loss else "unknown"
            beyond = (
                f" (train.steps={config.train.steps} asks for fewer)"
                if result.steps > config.train.steps
                else ""
            )
            print(
                f"run {result.run_dir} is already complete: {result.steps} steps{beyond}, "
                f"{result.samples_seen} samples seen, last logged loss {loss}; nothing was "
                f"trained or changed; model -> {result.model_dir}"
            )
        return 0
    if result.model_dir is not None:  # rank 0 only
        print(
            f"done: {result.steps} steps, {result.samples_seen} samples seen, last loss "
            f"{result.last_loss:.4f}; model -> {result.model_dir}"
        )
    return 0
