"""Atomic writes: a reader (or a restart after a kill) sees the old version or the whole new one, never half.

A file or folder is written under a hidden name beside its target, in the same folder (so on the same
file system), flushed to disk, and only then put in place with one rename:

    .<name>.partial-<pid>-<random>     written, fsync'ed          (a kill here: the target is untouched)
    rename / exchange  ->  <name>      one system call            (the old version, or the new one)

``os.replace`` is atomic for a file. A folder that already exists cannot be replaced by a rename, so the
two folders are swapped with Linux's ``renameat2(RENAME_EXCHANGE)``: one atomic step, after which the old
version sits at the hidden name and is removed. Where that call is missing (macOS), two renames are
used, with a window of microseconds in which the target is absent.

:func:`atomic_folder` yields the hidden folder to write into; ``carry_over(name)`` picks the files of the
old folder that the new one keeps (hard-linked, so not copied; a model folder keeps its tokenizer, say).
:func:`atomic_file` yields the hidden path of one file. A hidden leftover of a killed write is swept by
the next write to the same target (once its process is gone).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError

PARTIAL_MARK = ".partial-"  # hidden staging names: .<name>.partial-<pid>-<random>
RENAME_EXCHANGE = 2         # renameat2 flag (Linux): swap two paths in one atomic step


@contextmanager
def atomic_folder(target: str | os.PathLike, carry_over: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; when the block ends it replaces ``target`` in one step.

    Entries of the old ``target`` whose name ``carry_over`` accepts are linked into the new folder first.
    On an exception the hidden folder is removed and ``target`` is untouched; after a kill it stays hidden
    beside the target until the next ``atomic_folder`` on the same target.
    """
    target = Path(os.path.abspath(target))  # "." has no name to put beside
    if target.exists() and not target.is_dir():
        raise InputError(f"{target} is a file, not a folder; an atomic folder write never replaces a file.")
    check_not_a_workspace(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partial_writes(target)
    staging = staging_name(target)
    staging.mkdir()
    try:
        yield staging
        if carry_over is not None and target.is_dir():
            link_entries(target, staging, carry_over)
        sync_folder(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the failed write, or the old target after the swap


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden path beside ``path`` to write one file to; when the block ends it replaces ``path``."""
    path = Path(os.path.abspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_partial_writes(path)
    staging = staging_name(path)
    try:
        yield staging
        with open(staging, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging, path)
        sync_folder(path.parent, files=False)  # the rename itself reaches the disk
    finally:
        staging.unlink(missing_ok=True)


def check_not_a_workspace(target: Path) -> None:
    """Refuse a target whose replacement would throw away a workspace: the current folder or one above it
    (``""``, ``"."``, ``".."``), the home folder, the root, or a folder that holds a git repository."""
    here = Path(os.path.abspath(os.getcwd()))
    if target == here or target in here.parents or target == Path.home() or target == Path(target.anchor):
        raise InputError(f"{target} is the current folder, one above it, the home folder or the root: a save "
                         "replaces its target folder as a whole. Name a new folder for it, e.g. 'my-adapter'.")
    if (target / ".git").exists():
        raise InputError(f"{target} holds a git repository (.git): a save replaces its target folder as a whole. "
                         "Name a new folder inside it, e.g. its 'checkpoints/my-model'.")


def staging_name(target: Path) -> Path:
    return target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def link_entries(old: Path, new: Path, carry_over: Callable[[str], bool]) -> None:
    """Link the entries of ``old`` that ``carry_over`` accepts into ``new`` (folders are copied as links)."""
    for entry in old.iterdir():
        if (entry.name.startswith(".") and PARTIAL_MARK in entry.name) or not carry_over(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, new / entry.name)


def link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def sync_folder(folder: Path, files: bool = True) -> None:
    """Flush every file of ``folder`` (with ``files``) and the folder itself to disk, so a rename publishes
    complete files."""
    for path in folder.rglob("*") if files else ():
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the old ``target`` (if any) ends up at ``staging``, to be removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange(staging, target):
        return
    old = staging_name(target)
    os.rename(target, old)  # without an atomic swap: two renames, a window of microseconds
    os.rename(staging, target)
    os.rename(old, staging)


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically with Linux's renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def sweep_partial_writes(target: Path) -> None:
    """Remove hidden staging files and folders of ``target`` left by writes that were killed (process gone)."""
    prefix = f".{target.name}{PARTIAL_MARK}"
    for entry in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid = entry.name[len(prefix):].split("-")[0]
        if pid.isdigit() and process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no write in flight to the same target
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True
