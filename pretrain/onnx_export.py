"""Export a trained model's encoders as two ONNX graphs, checked against the PyTorch encoders.

``EXPORT_DIR`` layout::

    image_encoder.onnx       pixels (B, 3, S, S) float32, normalised -> image_embedding (B, D)
    text_encoder.onnx        tokens (B, L) int64 -> text_embedding (B, D)
    text_encoder.int8.onnx   the text graph with dynamically quantized int8 weights (optional)
    export.json              :class:`OnnxExport`: model hash, files + sha256, preprocessing,
                             tokenizer settings, and the parity measured at export

Both outputs are L2-normalised float32, the vectors ``clipforge-index embed`` writes, so an
exported encoder queries a clipforge index directly. The batch dimension is dynamic; the text
graph takes the tokenizer's whole context (``L`` = ``context_length``), because open_clip's
text tower adds a fixed-length positional table.

The graphs trace open_clip's own forward: clipforge's pooled-only forward groups caption rows by
length on the host, which a traced graph would freeze at the example's lengths, so it is switched
off for the export (:func:`~clipforge.pretrain.pooled_forward.disable_pooled_forward`). Parity
is then measured against the model as inference loads it (pooled forward on), over real images
and captions (the embedded demo set unless ``parity_data`` names shards): an export whose rows
fall below ``min_cosine`` is refused and nothing is left under ``out``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clipforge.data_tools.atomic import TMP_MARKER, write_json_atomic
from clipforge.data_tools.shardformat import sha256_file

from .models import LoadedModel, dual_encoder, load_model
from .pooled_forward import disable_pooled_forward

log = logging.getLogger(__name__)

EXPORT_FORMAT = "clipforge-onnx/1"
MANIFEST_NAME = "export.json"
IMAGE_FILE = "image_encoder.onnx"
TEXT_FILE = "text_encoder.onnx"
TEXT_INT8_FILE = "text_encoder.int8.onnx"
# Output names: "embedding" alone collides with the name the exporter gives the token-embedding
# node, which makes an invalid graph.
IMAGE_INPUT, IMAGE_OUTPUT = "pixels", "image_embedding"
TEXT_INPUT, TEXT_OUTPUT = "tokens", "text_embedding"
FP32_MIN_COSINE = 0.9999
"""Per-row cosine an fp32 graph must reach against the PyTorch encoder."""
INT8_MIN_COSINE = 0.99
"""Per-row cosine the int8 text graph must reach (dynamic int8 weight quantization moves
embeddings by ~1e-4-1e-3 in cosine on the demo model; 0.99 leaves room for larger towers)."""


class ExportError(ValueError):
    """The export cannot be made or failed its parity check; nothing was written."""


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the image graph's input (open_clip's eval transform)."""

    size: int
    """Output side S: the shorter side is resized to S, then the centre S x S is cropped."""
    mean: tuple[float, float, float]
    """Per-channel mean subtracted from RGB values scaled to [0, 1]."""
    std: tuple[float, float, float]
    """Per-channel std the values are divided by after the mean."""
    interpolation: str = "bicubic"
    """Resize filter."""
    layout: str = "NCHW float32 RGB"
    """Tensor layout, dtype and channel order of ``pixels``."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What turns a caption into the text graph's ``tokens``."""

    kind: str
    """``open_clip.SimpleTokenizer`` (CLIP's byte-level BPE, lower-cased, whitespace cleaned)
    or ``hf`` (a Hugging Face tokenizer named by ``hf_name``)."""
    context_length: int
    """Tokens per row: shorter captions are padded with 0, longer ones cut (EOT kept last)."""
    vocab_size: int | None = None
    """Vocabulary size of the BPE tokenizer."""
    sot_token_id: int | None = None
    """Start-of-text id, first in every row."""
    eot_token_id: int | None = None
    """End-of-text id, after the last caption token; the text tower pools at it."""
    hf_name: str | None = None
    """Hugging Face tokenizer name (``kind == "hf"``)."""

    def build(self) -> Any:
        """The tokenizer itself (callable: list of captions -> (B, context_length) tensor)."""
        from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

        if self.kind == "open_clip.SimpleTokenizer":
            return SimpleTokenizer(context_length=self.context_length)
        if self.kind == "hf" and self.hf_name:
            return HFTokenizer(self.hf_name, context_length=self.context_length)
        raise ExportError(f"tokenizer kind {self.kind!r} cannot be rebuilt")


@dataclass(frozen=True)
class EncoderFile:
    """One ONNX graph of an export and how closely it matches the PyTorch encoder."""

    file: str
    """File name inside the export directory."""
    sha256: str
    """Checksum of the file."""
    size_bytes: int
    """File size."""
    input: str
    """Input name."""
    output: str
    """Output name: (batch, embed_dim) float32, L2-normalised."""
    min_cosine: float
    """Lowest per-row cosine against the PyTorch encoder over the parity rows."""
    mean_cosine: float
    """Mean per-row cosine over the parity rows."""
    required_cosine: float
    """The bound ``min_cosine`` had to reach for the export to be written."""


@dataclass(frozen=True)
class OnnxExport:
    """``export.json``: everything a runtime needs besides the graphs."""

    model_hash: str
    """Weights hash of the exported model (the ``model_hash`` of embeddings and indexes)."""
    source: str
    """Where the exported weights came from."""
    embed_dim: int
    """Embedding dimension D."""
    opset: int
    """ONNX opset of the graphs."""
    image: EncoderFile
    """The image graph."""
    text: EncoderFile
    """The text graph."""
    preprocess: Preprocess
    """Image preprocessing."""
    tokenizer: TokenizerSpec
    """Text tokenization."""
    parity_rows: int
    """Images and captions the parity was measured on."""
    parity_data: str
    """Where those came from."""
    text_int8: EncoderFile | None = None
    """The int8 text graph, if exported."""
    torch_version: str = field(default_factory=lambda: torch.__version__)
    """torch that traced the graphs."""
    format: str = EXPORT_FORMAT
    """Format tag of this file."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any, where: str = MANIFEST_NAME) -> OnnxExport:
        """Parse and check ``export.json`` content; ``where`` names it in errors."""
        if not isinstance(obj, dict) or obj.get("format") != EXPORT_FORMAT:
            got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise ExportError(f"{where}: format {got!r} is not {EXPORT_FORMAT!r}")
        try:
            fields = dict(obj)
            fields["image"] = EncoderFile(**fields["image"])
            fields["text"] = EncoderFile(**fields["text"])
            if fields.get("text_int8") is not None:
                fields["text_int8"] = EncoderFile(**fields["text_int8"])
            pre = dict(fields["preprocess"])
            pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
            fields["preprocess"] = Preprocess(**pre)
            fields["tokenizer"] = TokenizerSpec(**fields["tokenizer"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise ExportError(f"{where}: malformed ({e})") from None


def read_export(export_dir: str | os.PathLike[str]) -> OnnxExport:
    """Read ``EXPORT_DIR/export.json`` and check every graph file against its size and sha256."""
    d = Path(export_dir)
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{d}: no {MANIFEST_NAME} (not a clipforge-export onnx directory)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: unreadable ({e})") from None
    export = OnnxExport.from_json(obj, str(path))
    for enc in (export.image, export.text, export.text_int8):
        if enc is None:
            continue
        f = d / enc.file
        if not f.is_file() or f.stat().st_size != enc.size_bytes or sha256_file(f) != enc.sha256:
            raise ExportError(f"{f}: missing or not the file {MANIFEST_NAME} records")
    return export


class _NormalisedImage(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = dual_encoder(self.model).encode_image(pixels)  # (B, D)
        return F.normalize(features, dim=-1)  # (B, D) L2-normalised


class _NormalisedText(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        features = dual_encoder(self.model).encode_text(tokens)  # (B, D)
        return F.normalize(features, dim=-1)  # (B, D) L2-normalised


def tokenizer_spec(tokenizer: Any) -> TokenizerSpec:
    """Describe an open_clip tokenizer for ``export.json``."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if isinstance(tokenizer, SimpleTokenizer):
        return TokenizerSpec(
            "open_clip.SimpleTokenizer",
            int(tokenizer.context_length),
            int(tokenizer.vocab_size),
            int(tokenizer.sot_token_id),
            int(tokenizer.eot_token_id),
        )
    if isinstance(tokenizer, HFTokenizer):
        name = getattr(tokenizer.tokenizer, "name_or_path", None)
        return TokenizerSpec("hf", int(tokenizer.context_length), hf_name=name)
    raise ExportError(f"cannot describe tokenizer {type(tokenizer).__name__} for export")


def parity_batch(
    loaded: LoadedModel, parity_data: str | None, rows: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(pixels (N, 3, S, S) float32 normalised, tokens (N, L) int64, where from): the first
    ``rows`` samples of ``parity_data`` (default: the embedded demo set) through the model's
    eval transforms, as embed and the service prepare them."""
    from clipforge.data_tools.reader import ReaderConfig, make_loader

    with contextlib.ExitStack() as stack:
        data = parity_data
        if data is None:
            from clipforge.data_tools.demo import write_demo_shards

            data = stack.enter_context(tempfile.TemporaryDirectory(prefix="clipforge-parity-"))
            write_demo_shards(data)
        per_sample, per_batch = loaded.image_transforms()
        loader = make_loader(
            data,
            per_sample,
            per_batch,
            loaded.tokenizer,
            ReaderConfig(batch_size=min(rows, 256)),
            num_workers=0,
        )
        images, texts, got = [], [], 0
        for batch in loader:
            images.append(batch["image"])  # (b, 3, S, S)
            texts.append(batch["text"])  # (b, L)
            got += len(batch["image"])
            if got >= rows:
                break
    if not images:
        raise ExportError(f"{parity_data}: no readable samples to check the export against")
    where = parity_data or "the embedded demo dataset"
    return torch.cat(images)[:rows].float(), torch.cat(texts)[:rows].long(), where


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64 * b64).sum(1) / (np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1))


def _export_graph(
    module: nn.Module, example: torch.Tensor, path: Path, names: tuple[str, str], opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    # The exporter narrates every stage on stdout; keep its words out of the user's console
    # unless it fails.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            program = torch.onnx.export(
                module.eval(),
                (example,),
                input_names=[names[0]],
                output_names=[names[1]],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(
            f"torch.onnx.export of {path.name} failed: {type(e).__name__}: {str(e)[:400]}"
        ) from e
    if program is None:  # only the legacy (dynamo=False) exporter returns nothing
        raise ExportError(f"torch.onnx.export of {path.name} returned no program")
    program.save(str(path))


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session of the graph at ``path`` (``threads``: intra-op threads)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError(
            "the parity check needs onnxruntime: pip install 'clipforge[onnx]'"
        ) from None
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"{path}: onnxruntime cannot load it: {str(e)[:300]}") from e


def _check(
    path: Path,
    inputs: tuple[str, np.ndarray],
    output: str,
    reference: np.ndarray,
    required: float,
) -> EncoderFile:
    got = session(path).run([output], {inputs[0]: inputs[1]})[0]  # (N, D)
    cos = _cosines(got, reference)
    if not np.all(np.isfinite(cos)) or cos.min() < required:
        worst = int(np.nanargmin(cos)) if np.any(np.isfinite(cos)) else 0
        raise ExportError(
            f"{path.name}: parity check failed: row {worst} has cosine {cos[worst]:.6f} "
            f"against the PyTorch encoder (at least {required} required)"
        )
    return EncoderFile(
        path.name,
        sha256_file(path),
        path.stat().st_size,
        inputs[0],
        output,
        float(cos.min()),
        float(cos.mean()),
        required,
    )


@contextlib.contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out``, renamed to ``out`` on success, removed on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}{TMP_MARKER}", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the export private to its writer
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_onnx(
    model_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    int8_text: bool = False,
    opset: int = 18,
    parity_data: str | None = None,
    parity_rows: int = 64,
    overwrite: bool = False,
) -> OnnxExport:
    """Export the image and text encoders of ``model_path`` (a run directory, ``model/`` or
    checkpoint) to ``out`` and check them against PyTorch; returns what ``export.json`` holds."""
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"{out_dir} exists and is not empty (overwrite=True replaces it)")
        if not (out_dir / MANIFEST_NAME).is_file():
            raise ExportError(f"{out_dir} is not an export directory; refusing to replace it")
    if parity_rows < 1:
        raise ExportError(f"parity_rows must be at least 1, not {parity_rows}")
    t0 = time.perf_counter()
    loaded = load_model(model_path, device="cpu")
    pixels, tokens, where = parity_batch(loaded, parity_data, parity_rows)
    with torch.inference_mode():
        # The reference: the encoders exactly as embedding and search run them.
        encoders = dual_encoder(loaded.model)
        ref_image = F.normalize(encoders.encode_image(pixels), dim=-1).numpy()  # (N, D)
        ref_text = F.normalize(encoders.encode_text(tokens), dim=-1).numpy()  # (N, D)
    disable_pooled_forward(loaded.model)
    with _staging_dir(out_dir) as stage:
        _export_graph(
            _NormalisedImage(loaded.model),
            pixels[:2],
            stage / IMAGE_FILE,
            (IMAGE_INPUT, IMAGE_OUTPUT),
            opset,
        )
        _export_graph(
            _NormalisedText(loaded.model),
            tokens[:2],
            stage / TEXT_FILE,
            (TEXT_INPUT, TEXT_OUTPUT),
            opset,
        )
        image = _check(
            stage / IMAGE_FILE,
            (IMAGE_INPUT, pixels.numpy()),
            IMAGE_OUTPUT,
            ref_image,
            FP32_MIN_COSINE,
        )
        text = _check(
            stage / TEXT_FILE, (TEXT_INPUT, tokens.numpy()), TEXT_OUTPUT, ref_text, FP32_MIN_COSINE
        )
        text_int8 = None
        if int8_text:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # onnxruntime logs a generic "consider pre-processing" advice on the root logger.
            root = logging.getLogger()
            level = root.level
            root.setLevel(logging.ERROR)
            try:
                quantize_dynamic(
                    stage / TEXT_FILE, stage / TEXT_INT8_FILE, weight_type=QuantType.QInt8
                )
            finally:
                root.setLevel(level)
            text_int8 = _check(
                stage / TEXT_INT8_FILE,
                (TEXT_INPUT, tokens.numpy()),
                TEXT_OUTPUT,
                ref_text,
                INT8_MIN_COSINE,
            )
        export = OnnxExport(
            model_hash=loaded.model_hash,
            source=loaded.source,
            embed_dim=int(ref_image.shape[1]),
            opset=opset,
            image=image,
            text=text,
            preprocess=Preprocess(loaded.image_size, loaded.mean, loaded.std),  # type: ignore[arg-type]
            tokenizer=tokenizer_spec(loaded.tokenizer),
            parity_rows=len(pixels),
            parity_data=where,
            text_int8=text_int8,
        )
        write_json_atomic(stage / MANIFEST_NAME, export.to_json())
        if out_dir.exists():
            shutil.rmtree(out_dir)
    log.info("exported %s -> %s in %.1f s", model_path, out_dir, time.perf_counter() - t0)
    return export
