"""``clipforge-export``: a trained model's encoders for other runtimes.

clipforge-export onnx --model runs/tiny --out tiny-onnx [--int8-text]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

PROG = "clipforge-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    onnx = sub.add_parser(
        "onnx",
        help="image and text encoders as ONNX graphs, checked against PyTorch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    onnx.add_argument(
        "--model", required=True, help="run directory, its model/ folder, or a step checkpoint"
    )
    onnx.add_argument("--out", required=True, help="export directory to create")
    onnx.add_argument(
        "--int8-text",
        action="store_true",
        help="also write text_encoder.int8.onnx (dynamic int8 weights, for CPU serving)",
    )
    onnx.add_argument("--opset", type=int, default=18, help="ONNX opset")
    onnx.add_argument(
        "--parity-data",
        default=None,
        help="SHARDS whose first samples check the graphs (default: the embedded demo set)",
    )
    onnx.add_argument(
        "--parity-rows", type=int, default=64, help="images and captions the check uses"
    )
    onnx.add_argument(
        "--overwrite", action="store_true", help="replace an existing export directory"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipforge").setLevel(logging.INFO)
    try:
        from clipforge.pretrain.onnx_export import export_onnx

        export = export_onnx(
            args.model,
            args.out,
            int8_text=args.int8_text,
            opset=args.opset,
            parity_data=args.parity_data,
            parity_rows=args.parity_rows,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"{args.out}: model {export.model_hash}, D={export.embed_dim}, opset {export.opset}")
    for enc in (export.image, export.text, export.text_int8):
        if enc is not None:
            print(
                f"  {enc.file:26s} {enc.size_bytes / 2**20:8.2f} MB   cosine vs PyTorch "
                f"min {enc.min_cosine:.6f} mean {enc.mean_cosine:.6f} "
                f"(>= {enc.required_cosine} required) over {export.parity_rows} rows"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
