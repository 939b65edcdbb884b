"""Zero-shot classification on a constructed case with a known answer, through the folder reader
and the classifier recipe (mean of normalised template embeddings, renormalised)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from clipforge.eval.data import EvalDataConfig, EvalDataError
from clipforge.eval.tasks import run_zeroshot
from clipforge.eval.zeroshot import build_classifier, load_classnames, load_templates
from clipforge.pretrain.distributed import DistInfo
from clipforge.pretrain.models import LoadedModel

COLORS = ("red", "green", "blue")
TEMPLATES = ("a photo of a {c} thing.", "a {c} drawing")


class ColorModel(nn.Module):
    """Image -> (mean R, mean G, mean B, 0); prompt -> its colour's one-hot plus +-1 in the 4th
    dimension depending on the template, which averaging over the two templates cancels."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.mean(dim=(2, 3))  # (B, 3) in [0, 1] (mean 0, std 1 normalisation)
        return torch.cat([rgb, torch.zeros(len(rgb), 1)], dim=1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(tokens), 4)
        out[torch.arange(len(tokens)), tokens[:, 0]] = 1.0
        out[:, 3] = torch.where(tokens[:, 1] == 0, 1.0, -1.0)
        return out


def color_tokenizer(texts: list[str]) -> torch.Tensor:
    rows = []
    for t in texts:
        color = next(i for i, c in enumerate(COLORS) if c in t)
        rows.append([color, 0 if t.startswith("a photo") else 1])
    return torch.tensor(rows)


def _loaded() -> LoadedModel:
    return LoadedModel(ColorModel(), color_tokenizer, 8, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), "h", "s")


def _folder(root: Path) -> Path:
    # One folder per class; the last blue image is mostly red: it is classified red.
    images = {
        "red/a.png": (255, 0, 0),
        "green/b.png": (0, 255, 0),
        "blue/c.png": (0, 0, 255),
        "blue/d.png": (153, 0, 102),
    }
    for rel, color in images.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), color).save(root / rel)
    return root


def test_classifier_is_the_mean_of_normalised_templates() -> None:
    clf = build_classifier(ColorModel(), color_tokenizer, COLORS, TEMPLATES, torch.device("cpu"))
    # Each prompt is (one-hot + +-1)/sqrt(2); the mean cancels the template part; renormalised.
    assert torch.allclose(clf, torch.cat([torch.eye(3), torch.zeros(3, 1)], dim=1))


def test_zeroshot_known_answer_on_an_image_folder(tmp_path: Path) -> None:
    data = _folder(tmp_path / "imgs")
    templates = tmp_path / "templates.txt"
    templates.write_text("\n".join(TEMPLATES) + "\n")
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    result = run_zeroshot(
        _loaded(),
        str(data),
        list(COLORS),
        info,
        str(templates),
        EvalDataConfig(batch_size=3, workers=0),
    )
    m = result["metrics"]
    assert m["acc1"] == pytest.approx(3 / 4)
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["acc5"] != m["acc5"]  # NaN: fewer than 5 classes, as CLIP_benchmark reports
    assert m["samples"] == 4
    # Class names from the data when none are given (sorted folder names).
    auto = run_zeroshot(_loaded(), str(data), None, info, str(templates), EvalDataConfig(workers=0))
    assert auto["config"]["classnames"] == ["blue", "green", "red"]
    assert auto["metrics"]["acc1"] == pytest.approx(3 / 4)


def test_unknown_labels_and_bad_inputs(tmp_path: Path) -> None:
    data = _folder(tmp_path / "imgs")
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    with pytest.raises(EvalDataError, match="not among the 2 class names"):
        run_zeroshot(_loaded(), str(data), ["red", "green"], info, None, EvalDataConfig(workers=0))
    bad = tmp_path / "t.txt"
    bad.write_text("no placeholder here\n")
    with pytest.raises(EvalDataError, match="placeholder"):
        load_templates(bad)
    with pytest.raises(EvalDataError, match="not a file"):
        load_classnames(str(tmp_path / "missing.txt"))
    with pytest.raises(EvalDataError, match="duplicated"):
        load_classnames("a,b,a")
    assert len(load_templates()) == 80  # the shipped ImageNet templates


def test_retrieval_on_an_image_folder_with_several_captions(tmp_path: Path) -> None:
    from clipforge.eval.retrieval import RetrievalConfig
    from clipforge.eval.tasks import run_retrieval

    root = tmp_path / "pairs"
    root.mkdir()
    for name, color, caption in (
        ("a", (255, 0, 0), "a photo of a red one\na photo of a red thing"),  # 2 captions
        ("b", (0, 255, 0), "a photo of a green one"),
        ("c", (0, 0, 255), "a blue drawing"),  # the other template: still blue
    ):
        Image.new("RGB", (8, 8), color).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(caption)
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    cfg = EvalDataConfig(batch_size=2, workers=0, split_lines=True)
    result = run_retrieval(_loaded(), str(root), info, cfg, RetrievalConfig(ks=(1, 2)))
    exact = result["metrics"]["exact"]
    assert result["data"]["images"] == 3 and result["data"]["texts"] == 4
    assert exact["text_to_image"]["R@1"] == 1.0 and exact["text_to_image"]["queries"] == 4
    assert exact["image_to_text"]["R@1"] == 1.0 and exact["image_to_text"]["queries"] == 3
