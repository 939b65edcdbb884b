"""A failed command leaves nothing it created: output folders and files made by this run are
removed when it fails, and nothing that existed before it is touched.

Files themselves are written atomically (:mod:`clipforge.data_tools.atomic`), so a failure never
leaves a half-written one; this module handles what a run makes around them: the folders it had
to create for its outputs, and whole output files written before a later step failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path


class CreatedOutputs:
    """What this run created, so that :meth:`discard` can undo exactly that.

    Folders made through :meth:`mkdir` are removed on discard if empty (a folder that holds
    finished work, e.g. complete shards a re-run resumes from, is kept) or, when made with
    ``scratch=True``, with everything in them. Files named by :meth:`watch_file` are removed
    if they did not exist when watched."""

    def __init__(self) -> None:
        self._dirs: list[tuple[Path, bool]] = []  # (folder made by this run, scratch), in order
        self._files: list[Path] = []  # output files that did not exist before this run

    def mkdir(self, path: str | os.PathLike[str], scratch: bool = False) -> Path:
        """``mkdir -p path``, remembering every folder of it that this call created."""
        target = Path(path)
        self._note_missing(target, scratch)
        target.mkdir(parents=True, exist_ok=True)
        return target

    def _note_missing(self, path: Path, scratch: bool) -> None:
        missing = []
        p = path.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        for folder in reversed(missing):  # outermost first
            self._dirs.append((folder, scratch))

    def watch_file(self, path: str | os.PathLike[str] | None) -> None:
        """``path`` is an output of this run: on failure, remove it if it is new, and the
        folders above it that do not exist yet (whoever creates them later)."""
        if path is None:
            return
        p = Path(path)
        if not p.exists():
            self._files.append(p)
        self._note_missing(p.parent, scratch=False)

    def discard(self) -> None:
        """Remove what this run created: new output files, scratch folders, empty folders."""
        for f in self._files:
            with contextlib.suppress(OSError):
                f.unlink()
        for folder, scratch in reversed(self._dirs):  # innermost first
            if not folder.is_dir():
                continue
            if scratch:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            with contextlib.suppress(OSError):
                _remove_empty_tree(folder)


def _remove_empty_tree(folder: Path) -> None:
    """Remove ``folder`` and its sub-folders when they hold no file at all."""
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        sub.rmdir()  # raises when not empty: a file is there, keep everything above it
    folder.rmdir()


@contextlib.contextmanager
def outputs_removed_on_failure(
    files: Iterable[str | os.PathLike[str] | None] = (),
) -> Iterator[CreatedOutputs]:
    """Run a command's body; if it raises (anything, Ctrl-C included), remove what it created.

    ``files`` are the command's output files (None entries are ignored); create further output
    folders with the yielded object's :meth:`CreatedOutputs.mkdir`."""
    created = CreatedOutputs()
    for f in files:
        created.watch_file(f)
    try:
        yield created
    except BaseException:
        created.discard()
        raise


__all__ = ["CreatedOutputs", "outputs_removed_on_failure"]


def make_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, outermost first (what a failed
    command may remove again without touching anything that was there before)."""
    target = Path(path)
    missing = []
    p = target.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    target.mkdir(parents=True, exist_ok=True)
    return missing[::-1]
