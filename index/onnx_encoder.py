"""Query encoders run by onnxruntime from a ``clipforge-export onnx`` directory.

::

    from clipforge.index.onnx_encoder import OnnxQueryEncoder
    enc = OnnxQueryEncoder.open("tiny-onnx")            # or int8_text=True
    vectors = enc.encode_text(["a red heart", "pizza"])  # (2, D) float32, L2-normalised

The vectors are the ones the exported model's PyTorch encoders give (the export checked that
row by row), so they query an index built from that model's embeddings. onnxruntime is an
optional dependency (``pip install 'clipforge[onnx]'``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipforge.pretrain.onnx_export import ExportError, OnnxExport, read_export, session


@dataclass
class OnnxQueryEncoder:
    """The text (and image) graph of an export, with its tokenizer."""

    export: OnnxExport
    """What ``export.json`` says."""
    directory: Path
    """The export directory."""
    text_session: Any
    """onnxruntime session of the text graph (fp32 or int8)."""
    image_session: Any
    """onnxruntime session of the image graph."""
    tokenizer: Any
    """Captions -> (B, context_length) token tensor, rebuilt from ``export.json``."""
    int8_text: bool
    """Whether the text graph is the int8 one."""

    @classmethod
    def open(
        cls,
        export_dir: str | os.PathLike[str],
        *,
        int8_text: bool = False,
        threads: int | None = None,
        expect_model_hash: str | None = None,
    ) -> OnnxQueryEncoder:
        """Open ``export_dir`` (checked against ``export.json``); ``expect_model_hash`` refuses
        an export of another model than the index's."""
        d = Path(export_dir)
        export = read_export(d)
        if expect_model_hash is not None and export.model_hash != expect_model_hash:
            raise ExportError(
                f"{d}: exported from model {export.model_hash}, but the index holds embeddings "
                f"of model {expect_model_hash}; export that model"
            )
        text = export.text_int8 if int8_text else export.text
        if text is None:
            raise ExportError(f"{d}: has no int8 text graph (export with --int8-text)")
        return cls(
            export,
            d,
            session(d / text.file, threads),
            session(d / export.image.file, threads),
            export.tokenizer.build(),
            int8_text,
        )

    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """(Q, L) int64 tokens -> (Q, D) float32 L2-normalised embeddings."""
        name = (self.export.text_int8 if self.int8_text else self.export.text) or self.export.text
        return self.text_session.run([name.output], {name.input: tokens.astype(np.int64)})[0]

    def encode_text(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> (Q, D) float32 L2-normalised embeddings."""
        tokens = self.tokenizer(list(texts)).numpy()  # (Q, context_length)
        return self.encode_tokens(tokens)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """(Q, 3, S, S) float32 normalised pixels -> (Q, D) float32 L2-normalised embeddings."""
        image = self.export.image
        return self.image_session.run([image.output], {image.input: pixels.astype(np.float32)})[0]
