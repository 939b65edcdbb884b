"""Atomic output: a write that runs out of space says so, names the file and leaves nothing."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

from clipforge.data_tools import atomic
from clipforge.data_tools.atomic import OutOfSpaceError, atomic_output, write_bytes_atomic


def test_enospc_becomes_out_of_space_error_and_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "out.bin"
    with pytest.raises(OutOfSpaceError) as info, atomic_output(final) as tmp:
        tmp.write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.path == final
    assert info.value.written_bytes == 1000
    assert str(final) in str(info.value) and "no space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_errnoless_failure_on_a_nearly_full_disk_is_out_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch.save reports ENOSPC as a bare RuntimeError: the free space left decides.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: usage._replace(free=4096))
    full = pytest.raises(OutOfSpaceError, match=r"0\.0 MB free")
    with full, atomic_output(tmp_path / "a") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("unexpected pos 576 vs 534")


def test_errnoless_oserror_on_a_nearly_full_disk_is_out_of_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # numpy's np.save on a full disk: OSError("... requested and ... written"), no errno.
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda _: usage._replace(free=0))
    with pytest.raises(OutOfSpaceError), atomic_output(tmp_path / "a.npy") as tmp:
        tmp.write_bytes(b"x")
        raise OSError("4000 requested and 1024 written")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), atomic_output(tmp_path / "a") as tmp:
        tmp.write_bytes(b"x")
        raise RuntimeError("boom")
    with pytest.raises(PermissionError), atomic_output(tmp_path / "b"):
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_real_full_filesystem(tiny_filesystem: Path) -> None:
    (tiny_filesystem / "kept.bin").write_bytes(b"k" * 1000)
    final = tiny_filesystem / "big.bin"
    with pytest.raises(OutOfSpaceError) as info:
        write_bytes_atomic(final, b"x" * 3_000_000)
    assert info.value.path == final and "no space left" in str(info.value)
    assert sorted(p.name for p in tiny_filesystem.iterdir()) == ["kept.bin"]


def test_real_full_filesystem_torch_save(tiny_filesystem: Path) -> None:
    torch = pytest.importorskip("torch")
    final = tiny_filesystem / "ckpt.pt"
    with pytest.raises(OutOfSpaceError), atomic_output(final) as tmp:
        torch.save({"w": torch.zeros(1_000_000)}, tmp)
    assert list(tiny_filesystem.iterdir()) == []
