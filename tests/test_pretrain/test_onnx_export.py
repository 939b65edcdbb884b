"""clipforge-export onnx: the exported graphs give the PyTorch encoders' vectors on real demo
images and captions (fp32: cosine >= 0.9999 per row; int8 text: >= 0.99), the export directory
is verified on load, and a failed export leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime", reason="the onnx extra (onnxruntime) is not installed")

from clipforge.index.onnx_encoder import OnnxQueryEncoder
from clipforge.pretrain import onnx_export
from clipforge.pretrain.export_cli import main
from clipforge.pretrain.models import load_model
from clipforge.pretrain.onnx_export import ExportError, parity_batch, read_export

# Captions of very different lengths in one batch: the PyTorch text tower groups rows by length,
# the graph must not depend on the lengths it was traced with.
MIXED_CAPTIONS = [
    "pizza",
    "a red heart",
    "smiling face with sunglasses, face, sun, glasses, cool, bright, weather, summer, "
    "beach, vacation, happy, joy, fun, laugh, smile, grin, party, celebration, sunny",
    "flag of Japan",
]


@pytest.fixture(scope="module")
def export_dir(onnx_export_dir: Path) -> Path:
    return onnx_export_dir


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a.astype(np.float64) * b.astype(np.float64)).sum(1)


def test_export_records_parity_and_files(export_dir: Path, trained_demo_run: Path) -> None:
    export = read_export(export_dir)
    assert export.model_hash == load_model(trained_demo_run).model_hash
    assert export.parity_rows == 64
    assert export.image.min_cosine >= onnx_export.FP32_MIN_COSINE
    assert export.text.min_cosine >= onnx_export.FP32_MIN_COSINE
    assert export.text_int8 is not None and export.text_int8.min_cosine >= 0.99
    assert export.text_int8.size_bytes < export.text.size_bytes / 2
    assert export.tokenizer.kind == "open_clip.SimpleTokenizer"
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "export.json",
        "image_encoder.onnx",
        "text_encoder.int8.onnx",
        "text_encoder.onnx",
    ]


def test_graphs_match_pytorch_on_other_demo_rows(
    export_dir: Path, trained_demo_run: Path, demo: Path
) -> None:
    """Rows the export did not check (samples 64-255 of the demo set) and mixed-length
    captions, through the runtime encoder, against the model as inference loads it."""
    loaded = load_model(trained_demo_run)
    pixels, tokens, _ = parity_batch(loaded, str(demo), 256)
    pixels, tokens = pixels[64:], tokens[64:]  # (192, 3, S, S), (192, L)
    enc = OnnxQueryEncoder.open(export_dir, expect_model_hash=loaded.model_hash)
    with torch.inference_mode():
        ref_img = F.normalize(loaded.model.encode_image(pixels), dim=-1).numpy()
        ref_txt = F.normalize(loaded.model.encode_text(tokens), dim=-1).numpy()
        ref_mixed = F.normalize(
            loaded.model.encode_text(loaded.tokenizer(MIXED_CAPTIONS)), dim=-1
        ).numpy()
    assert _cos(enc.encode_pixels(pixels.numpy()), ref_img).min() >= 0.9999
    assert _cos(enc.encode_tokens(tokens.numpy()), ref_txt).min() >= 0.9999
    got = enc.encode_text(MIXED_CAPTIONS)  # (4, D), tokenizer rebuilt from export.json
    assert got.shape == ref_mixed.shape and got.dtype == np.float32
    assert _cos(got, ref_mixed).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    int8 = OnnxQueryEncoder.open(export_dir, int8_text=True)
    assert _cos(int8.encode_text(MIXED_CAPTIONS), ref_mixed).min() >= 0.99


def test_export_of_another_model_is_refused_for_an_index(export_dir: Path) -> None:
    with pytest.raises(ExportError, match="export that model"):
        OnnxQueryEncoder.open(export_dir, expect_model_hash="0" * 16)


def test_tampered_graph_is_refused(export_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(export_dir, copy)
    data = bytearray((copy / "text_encoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "text_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"text_encoder\.onnx"):
        read_export(copy)
    manifest = json.loads((copy / "export.json").read_text())
    manifest["format"] = "something-else/9"
    (copy / "export.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="format"):
        read_export(copy)


def test_failed_parity_leaves_nothing(
    export_dir: Path,
    trained_demo_run: Path,
    demo: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A text graph that is not the model's (here the int8 one posing as fp32) fails the fp32
    check: exit 2, one line naming the graph and the worst row, no directory left."""

    def fake_export(module, example, path, names, opset):  # type: ignore[no-untyped-def]
        source = "text_encoder.int8.onnx" if path.name == "text_encoder.onnx" else path.name
        shutil.copy(export_dir / source, path)

    monkeypatch.setattr(onnx_export, "_export_graph", fake_export)
    out = tmp_path / "bad-export"
    argv = ["onnx", "--model", str(trained_demo_run), "--out", str(out)]
    assert main([*argv, "--parity-data", str(demo), "--parity-rows", "32"]) == 2
    err = capsys.readouterr().err
    assert "text_encoder.onnx: parity check failed" in err and "cosine" in err
    assert list(tmp_path.iterdir()) == []


def test_existing_directory_is_not_replaced(
    trained_demo_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["onnx", "--model", str(trained_demo_run), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["onnx", "--model", str(trained_demo_run), "--out", str(out), "--overwrite"]) == 2
    assert "not an export directory" in capsys.readouterr().err
