"""Interrupted and repeated writes: no partial shard under a final name, resume keeps complete
shards, ``--no-resume`` rewrites them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clipforge.data_tools.atomic import TMP_MARKER, atomic_output
from clipforge.data_tools.cli import main
from clipforge.data_tools.writer import WriteConfig, write_shards

from .shard_helpers import make_folder_source

# Run as a script so that the spawned worker processes import it too (as __mp_main__) and get
# the patch: the worker SIGKILLs itself in the middle of shard 1, after part of it is on disk.
_CRASHING_WRITE = textwrap.dedent(
    """
    import os
    import signal
    import sys

    from clipforge.data_tools import writer

    _add_member = writer.add_member


    def _add_member_then_die(tar, name, data):
        _add_member(tar, name, data)
        if name == "0000010000.txt":  # shard 1, first sample half written
            tar.fileobj.flush()
            os.kill(os.getpid(), signal.SIGKILL)


    writer.add_member = _add_member_then_die

    if __name__ == "__main__":
        from clipforge.data_tools.cli import main

        sys.exit(main(sys.argv[1:]))
    """
)


def _files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())


def test_killed_worker_leaves_no_final_named_partial_shard_and_rerun_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_folder_source(tmp_path / "src", 9)
    args = ["write", str(tmp_path / "src"), "OUT", "--image-size", "16", "--shard-size", "3"]
    args += ["--no-progress", "--workers", "1"]
    script = tmp_path / "crashing_write.py"
    script.write_text(_CRASHING_WRITE)
    out = tmp_path / "out"
    crashed = subprocess.run(
        [sys.executable, str(script), *[str(out) if a == "OUT" else a for a in args]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr

    files = _files(out)
    # shard 0 was complete and is kept under its final name; shard 1 exists only as a temp file
    assert "shard-000000.tar" in files
    assert "shard-000001.tar" not in files
    temps = [f for f in files if f.startswith(f"shard-000001.tar{TMP_MARKER}")]
    assert len(temps) == 1 and (out / temps[0]).stat().st_size > 0
    assert "manifest.json" not in files and "stats.json" not in files

    # a reference run that was never interrupted
    ref = tmp_path / "ref"
    assert main([a.replace("OUT", str(ref)) for a in args]) == 0
    capsys.readouterr()

    # re-running the same command keeps shard 0, writes the rest, and removes the stale temp
    assert main([a.replace("OUT", str(out)) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "9 samples in 3 shards (2 written, 1 already complete)" in printed
    assert not [f for f in _files(out) if TMP_MARKER in f]
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert (out / "manifest.json").read_text() == (ref / "manifest.json").read_text()
    assert main(["verify", str(out)]) == 0


def test_rerun_keeps_complete_shards_and_rewrites_damaged_or_missing_ones(tmp_path: Path) -> None:
    make_folder_source(tmp_path / "src", 9)
    out = tmp_path / "out"
    config = WriteConfig(image_size=16, shard_size=3)
    write_shards(tmp_path / "src", out, config, progress=False)
    names = ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    original = {n: (out / n).read_bytes() for n in names}
    inode0 = (out / names[0]).stat().st_ino

    # shard 1 cut short (its size no longer matches its record), shard 2 gone
    (out / names[1]).write_bytes(original[names[1]][:1000])
    (out / names[2]).unlink()
    result = write_shards(tmp_path / "src", out, config, progress=False)

    assert (result.written, result.reused) == (2, 1)
    # shard 0 was not touched: the same file (a rewrite renames a new file into place)
    assert (out / names[0]).stat().st_ino == inode0
    assert {n: (out / n).read_bytes() for n in names} == original
    assert result.manifest.samples == 9

    # --no-resume rewrites everything, to the same bytes
    rewritten = write_shards(
        tmp_path / "src", out, WriteConfig(image_size=16, shard_size=3, resume=False), False
    )
    assert (rewritten.written, rewritten.reused) == (3, 0)
    assert (out / names[0]).stat().st_ino != inode0
    assert {n: (out / n).read_bytes() for n in names} == original


def test_no_resume_flag_on_the_command_line_rewrites_complete_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_folder_source(tmp_path / "src", 4)
    args = ["write", str(tmp_path / "src"), str(tmp_path / "out"), "--image-size", "8"]
    args += ["--shard-size", "2", "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    assert main([*args, "--no-resume"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "samples in" in ln]
    assert [ln.split("(")[1].split(")")[0] for ln in lines] == [
        "2 written, 0 already complete",
        "0 written, 2 already complete",
        "2 written, 0 already complete",
    ]


def test_atomic_output_removes_the_temp_file_when_writing_fails(tmp_path: Path) -> None:
    final = tmp_path / "shard-000000.tar"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_output(final) as tmp:
        tmp.write_bytes(b"half a shard")
        assert tmp.name == f"shard-000000.tar{TMP_MARKER}{os.getpid()}"
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
