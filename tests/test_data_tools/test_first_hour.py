"""What a new user meets in the first hour of clipforge-data: class folders become labels, an
image folder passed as shards says what to do, and a failed command leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipforge.data_tools.cli import main
from clipforge.data_tools.reader import ShardSpecError, make_loader
from clipforge.data_tools.transforms import clip_image_transforms
from tests.test_data_tools.shard_helpers import all_samples, make_folder_source


def _class_folders(root: Path) -> Path:
    make_folder_source(root / "cats", 3, size=(8, 8))
    make_folder_source(root / "dogs", 2, size=(8, 8))
    make_folder_source(root, 1, size=(8, 8))  # an image in no class folder
    return root


def test_label_from_folder_stores_the_class_folder_as_category(tmp_path: Path) -> None:
    src = _class_folders(tmp_path / "photos")
    out = tmp_path / "shards"
    assert main(["write", str(src), str(out), "--label-from-folder", "--no-progress"]) == 0
    metas = {
        json.loads(m["json"])["source"]: json.loads(m["json"]) for m in all_samples(out).values()
    }
    assert len(metas) == 6
    for source, meta in metas.items():
        if "/" in source:
            assert meta["category"] == source.split("/")[0], meta
        else:
            assert "category" not in meta  # directly in SRC: no class
    assert sorted(m.get("category") for m in metas.values() if "category" in m) == [
        "cats", "cats", "cats", "dogs", "dogs",
    ]  # fmt: skip
    # without the option the shards carry no label (as before)
    plain = tmp_path / "plain"
    assert main(["write", str(src), str(plain), "--no-progress"]) == 0
    assert not any("category" in json.loads(m["json"]) for m in all_samples(plain).values())


def test_label_from_folder_on_a_table_is_a_clear_error(tmp_path: Path, capsys) -> None:
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nx.png,a cat\n")
    assert main(["write", str(table), str(tmp_path / "out"), "--label-from-folder"]) == 2
    err = capsys.readouterr().err
    assert "--label-from-folder needs a folder" in err and str(table) in err
    assert not (tmp_path / "out").exists()


def test_an_image_folder_given_as_shards_says_to_write_it_first(tmp_path: Path, capsys) -> None:
    src = _class_folders(tmp_path / "photos")
    transform, _ = clip_image_transforms(8)
    with pytest.raises(ShardSpecError) as info:
        make_loader(src, transform)
    message = str(info.value)
    assert "holds images and captions" in message
    assert f"clipforge-data write {src} SHARDS_DIR" in message
    # the same through training's --set data.train=FOLDER
    from clipforge.pretrain.cli import main as pretrain_main

    run = tmp_path / "run"
    argv = ["--config", "tiny", "--set", f"data.train={src}", "--set", f"train.run_dir={run}"]
    assert pretrain_main(argv) == 2
    err = capsys.readouterr().err
    assert f"clipforge-data write {src} SHARDS_DIR" in err and "Traceback" not in err
    # a folder with neither shards nor raw data keeps the short message
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardSpecError, match=r"empty: folder holds no \.tar shards$"):
        make_loader(tmp_path / "empty", transform)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["write", "{tmp}/nope", "{tmp}/out/shards"], "does not exist"),
        (["write", "{tmp}/empty-src", "{tmp}/out/shards"], "holds no images"),
        (["write", "{tmp}/bad.csv", "{tmp}/out/shards"], "cannot tell which column"),
        (["write", "{tmp}/bad.txt", "{tmp}/out/shards"], "expected a folder"),
    ],
)
def test_a_failed_write_leaves_no_folder_it_created(
    tmp_path: Path, argv: list[str], message: str, capsys
) -> None:
    (tmp_path / "empty-src").mkdir()
    (tmp_path / "bad.csv").write_text("url,words\nx.png,a cat\n")
    (tmp_path / "bad.txt").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no out/, no out/shards/


def test_a_failed_write_keeps_what_existed_before(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    assert main(["write", str(tmp_path / "nope"), str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]
    # not a failure: a run whose every row is bad succeeds, counting them (stats.json)
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"not a png")
    (src / "a.txt").write_text("a caption")
    assert main(["write", str(src), str(out / "new"), "--no-progress"]) == 0  # counted, kept
    assert (out / "new" / "manifest.json").is_file()
