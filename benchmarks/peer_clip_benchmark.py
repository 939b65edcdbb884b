"""Run CLIP_benchmark (in its own venv) on a clipforge checkpoint. No clipforge imports here.

    PEER_PYTHON peer_clip_benchmark.py --model-config CFG.json --name NAME -- <clip_benchmark eval
    arguments, with --model NAME --pretrained WEIGHTS>

Registers the model config with open_clip under NAME (CLIP_benchmark only knows open_clip's
built-in names), then runs ``clip_benchmark eval`` with the remaining arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(
            "usage: peer_clip_benchmark.py --model-config CFG --name NAME -- ARGS", file=sys.stderr
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-config", required=True)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv[:split])

    # This script's folder (the repository's benchmarks/) is sys.path[0]: drop it so that
    # nothing of clipforge's checkout shadows the peer's own packages.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    import open_clip

    cfg = json.loads(Path(args.model_config).read_text())
    cfg = cfg.get("model_cfg", cfg)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{args.name}.json"  # open_clip registers a config by file stem
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)
    from clip_benchmark.cli import main as cb_main

    sys.argv = ["clip_benchmark", "eval", *argv[split + 1 :]]
    cb_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
