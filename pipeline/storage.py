"""Writing files and directories so that a kill, a crash or a full disk never leaves half of one.

Every file is written under a temporary name next to its target (`.NAME.tmp-<random>`), flushed
to disk (fsync), renamed over the target, and the directory entry flushed too: after a crash at
any moment the path holds the old content or the new one. A directory (a preprocess stage, a
report) is built under a temporary name and published the same way, by a rename. Temporaries a
killed process left behind start with a dot, so no reader sees them; `remove_leftovers` deletes
them. Everything that writes a result goes through this module: the stage cache, checkpoints and
run files, metric files, the report, the training tensors (as a stage) and exports.

A write that fails for a reason the user can fix (a full disk, a read-only directory) raises an
OSError naming the target, which `sdm` prints as one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pipeline.errors import InputError


def temporary_path(path: Path, kind: str = "tmp") -> Path:
    """A hidden sibling of `path`: `.NAME.tmp-<random>` (or `.NAME.old-<random>`)."""
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex}")


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(handle)` fills a temporary file opened for binary writing; the file is then fsync'ed
    and renamed to `path`. On any failure the temporary file is removed and `path` is untouched."""
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        fsync_directory(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        failed = as_os_error(error, path)
        if failed is not None:
            raise failed from None
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Indented JSON with sorted keys (stable bytes for the same payload)."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode())


def publish_directory(staging: Path, target: Path) -> None:
    """Rename a complete directory into place: its files and itself are fsync'ed first; an old
    `target` is moved aside and removed after the rename, so a reader finds the old directory or
    the new one, never a mix."""
    for written in staging.rglob("*"):
        if written.is_file():
            fsync_file(written)
    fsync_directory(staging)
    if target.exists():
        retired = temporary_path(target, "old")
        os.replace(target, retired)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    fsync_directory(target.parent)


def remove_leftovers(parent: Path, name: str) -> None:
    """Delete the temporaries of `parent/name` that a killed process left behind."""
    for leftover in parent.glob(f".{name}.*-*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def ensure_output_dir(path: Path, flag: str = "--out", *, create: bool = True) -> bool:
    """Check that an output path can be a directory and create it (unless `create` is off);
    True when this call created it. A file in the way is the user's to fix: one line naming `flag`."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: the output path is a file; choose a directory with {flag}")
    if path.is_dir() or not create:
        return False
    try:
        path.mkdir(parents=True)
    except FileExistsError:  # another process (a sibling bucket job) made it a moment ago
        return False
    except OSError as error:
        raise InputError(f"{path}: cannot create the output directory ({error.strerror})") from None
    return True


def as_os_error(error: BaseException, path: Path) -> OSError | None:
    """The operating-system error behind a failed write (a full disk, a read-only directory),
    naming `path` where it names no file or one of our temporaries; polars reports such errors inside its own
    exception types, with "(os error N)" in the message. None for anything else."""
    if isinstance(error, OSError):
        if error.errno is None or (error.filename and ".tmp-" not in str(error.filename)):
            return error  # names the file it is about (an input, say) already
        return OSError(error.errno, error.strerror, str(path))
    reported = re.search(r"\(os error (\d+)\)", str(error))
    if reported is None or isinstance(error, InputError):
        return None
    code = int(reported.group(1))
    return OSError(code, os.strerror(code), str(path))
