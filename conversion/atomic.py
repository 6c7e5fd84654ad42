"""Atomic output: a file or folder appears under its final name only once it is complete.

Everything is written under a temporary name beside its target (same file system, so the last step is one rename)
and renamed at the end; a folder that is already there is swapped out by `replace_dir`, in three steps that leave a
complete folder (old or new) under the target name whichever step fails, and `recover_dir` completes a swap whose
process was killed between them. Standard library only, so every part may import it; it must not know what it
writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

# The temporaries of `atomic_output_file` and `atomic_write_*`: hidden, so a listing of a folder being written (a
# report, a model card next to the weights) shows only finished files; `llama-moe push` never uploads them.
TEMPORARY_FILE_PATTERN = ".*.tmp-*"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_existing_output(out: str | os.PathLike, overwrite: bool) -> None:
    """The one refusal of an output that exists (checked early by commands, and again when writing)."""
    if os.path.exists(out) and not overwrite:
        raise ValueError(f"{out} already exists; choose another output path or pass --overwrite.")


def _output_path(out: str | os.PathLike, overwrite: bool) -> tuple[str, str]:
    """(absolute `out`, its parent folder, created): refused when `out` exists and `overwrite` is off."""
    out = os.path.abspath(os.fspath(out))
    refuse_existing_output(out, overwrite)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    return out, parent


def _aside(target: str) -> str:
    """Where `replace_dir` keeps the old folder while the new one is renamed in: hidden, beside the target (a
    name no checkpoint glob or model lookup matches)."""
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(parent, f".{name}.old")


def recover_dir(target: str | os.PathLike) -> None:
    """Finish or undo a `replace_dir` that was killed between its steps: with no folder at `target`, the old one
    moved aside goes back; with both, the old one is removed (the new one was already in place)."""
    target = os.fspath(target)
    aside = _aside(target)
    if not os.path.isdir(aside):
        return
    if os.path.exists(target):
        shutil.rmtree(aside)
    else:
        os.rename(aside, target)


def recover_dirs(parent: str | os.PathLike) -> None:
    """`recover_dir` for every folder of `parent` that a `replace_dir` was replacing when it was killed."""
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        if name.startswith(".") and name.endswith(".old") and len(name) > len("..old"):
            recover_dir(os.path.join(parent, name[1 : -len(".old")]))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the finished folder `new` to `target`, replacing a folder already there: (1) the old folder is moved
    aside, (2) `new` is renamed in, (3) the old one is removed. An error in (2) moves the old one back; an error in
    (3) leaves the new one in place. If the process dies between (1) and (2), `recover_dir` (which the next
    `replace_dir` of the same target runs first) puts the old one back."""
    new, target = os.fspath(new), os.fspath(target)
    recover_dir(target)
    if not os.path.exists(target):
        os.rename(new, target)
        return
    aside = _aside(target)
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False):
    """Yield a fresh folder `OUT.tmp-<random>` beside `out`; it becomes `out` (`replace_dir`) only if the block
    finishes, and is removed if it raises."""
    out, parent = _output_path(out, overwrite)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it owner-only; a model folder is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # already renamed when only removing the old folder failed
        raise


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary file path `.NAME.tmp-<random>` beside `out`; it becomes `out` only if the block finishes,
    and is removed if it raises."""
    out, parent = _output_path(out, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it owner-only; the output is an ordinary file
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` (replacing it, creating its folder) so that readers see the old or the new file whole."""
    with atomic_output_file(path, overwrite=True) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))
