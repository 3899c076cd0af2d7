"""Training tensors on disk: written once from the Parquet splits, memory-mapped by every trainer.

    DATA/tensors/train/   items.npy [N, T]  targets.npy [N, T]  lengths.npy [N]  user.npy [N]
                          profile.npy [N, P]  long_<feature>.npy [N, L_f]  manifest.json

All int32 (0 = padding), in the row order of `splits/train.parquet`. A training process maps the
files instead of reading them (`map_array`), so its private memory does not grow with the number
of training sessions: it gathers the rows of each batch, and the pages it touched stay in the
page cache, shared by every process on the machine (DDP ranks included) and dropped by the
kernel when memory is short.

The files are built by the first `sdm train` on DATA and reused while the events, long-term and
splits stages are unchanged (their manifest digests are the fingerprint). The build goes bucket
by bucket (the user buckets of `sdm preprocess`, whose train and long-term parts hold the same
users), so it needs the memory of one bucket, not of the whole split; it writes into a temporary
directory that is renamed into place when complete, under a lock that makes concurrent trainers
(several DDP ranks on one machine) wait for one build instead of racing.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from filelock import FileLock

from pipeline.cache import MANIFEST, build_stage, is_current, manifest_digest, package_version, read_manifest
from pipeline.errors import InputError
from pipeline.contract import DataDir, long_term_column

TRAIN = "train"
FORMAT = 1  # bump when the files' layout changes, so that old caches are rebuilt
DTYPE = np.int32
HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def training_parts(data: Path) -> list[tuple[Path, Path]]:
    """(train part, long-term part) pairs holding the same users: one pair per user bucket."""
    train, long_term = DataDir(data).split("train"), DataDir(data).long_term
    if not train.is_dir():
        return [(train, long_term)]
    return [(part, long_term / part.name) for part in sorted(train.glob("*.parquet"))]


def fingerprint(data: Path) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": package_version(),
        "upstream": {stage: manifest_digest(data / stage) for stage in ("events", "long_term", "splits")},
    }


def padded(column: pl.Series, width: int | None = None) -> np.ndarray:
    """A list column -> [N, width] int64 array, left-aligned and 0-padded (longer lists are cut);
    width defaults to the longest list (at least 1)."""
    lengths = column.list.len().fill_null(0).to_numpy().astype(np.int64)
    width = max(1, int(lengths.max(initial=0)) if width is None else width)
    flat = column.explode().drop_nulls().to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    columns = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = columns < width
    array = np.zeros((len(lengths), width), dtype=np.int64)
    array[rows[keep], columns[keep]] = flat[keep]
    return array


def attach_context(rows: pl.DataFrame, long_term: pl.DataFrame, users: pl.DataFrame) -> pl.DataFrame:
    """Each row's long-term sets (by session) and user profile (by user), in the rows' order."""
    return rows.join(long_term, on="session", how="left", maintain_order="left").join(
        users, on="user", how="left", maintain_order="left"
    )


def context_arrays(
    frame: pl.DataFrame, profile_fields: list[str], long_widths: dict[str, int | None]
) -> dict[str, np.ndarray]:
    """user [N], profile [N, P] and long_<feature> [N, L_f] of joined rows (0 = none); a width of
    None is the longest set in the frame."""
    arrays = {
        "user": frame.get_column("user").to_numpy().astype(np.int64),
        "profile": frame.select(profile_fields).fill_null(0).to_numpy().astype(np.int64).reshape(frame.height, len(profile_fields)),
    }
    for feature, width in long_widths.items():
        arrays[f"long_{feature}"] = padded(frame.get_column(long_term_column(feature)), width)
    return arrays


def training_arrays(rows: pl.DataFrame, session_width: int) -> dict[str, np.ndarray]:
    """items [N, T], lengths [N] and targets [N, T]: position t predicts item t + 1, the last
    position the first item of the user's next training session (0 where there is none)."""
    items = padded(rows.get_column("items"), session_width)
    lengths = rows.get_column("items").list.len().to_numpy().astype(np.int64)
    targets = np.zeros_like(items)
    targets[:, :-1] = items[:, 1:]
    targets[np.arange(len(lengths)), lengths - 1] = rows.get_column("next_item").to_numpy()
    return {"items": items, "lengths": lengths, "targets": targets}


def max_list_lengths(path: Path, columns: list[str]) -> dict[str, int]:
    """The longest list of each column over a whole table (a file or a directory of parts), at least 1."""
    longest = pl.scan_parquet(path).select(pl.col(c).list.len().max() for c in columns).collect(engine="streaming")
    return {c: max(1, int(longest.get_column(c)[0] or 0)) for c in columns}


def build_training_tensors(data: Path, profile_fields: list[str], long_features: list[str]) -> Callable[[Path], dict[str, Any]]:
    """The stage builder: writes every array of the training split into `directory`, part by part."""

    def build(directory: Path) -> dict[str, Any]:
        train_path, long_term_path = DataDir(data).split("train"), DataDir(data).long_term
        n_rows = pl.scan_parquet(train_path).select(pl.len()).collect().item()
        session_width = max_list_lengths(train_path, ["items"])["items"]
        long_columns = [long_term_column(f) for f in long_features]
        long_widths = dict(zip(long_features, max_list_lengths(long_term_path, long_columns).values(), strict=True))
        shapes = {
            "items": (n_rows, session_width), "targets": (n_rows, session_width), "lengths": (n_rows,),
            "user": (n_rows,), "profile": (n_rows, len(profile_fields)),
            **{f"long_{f}": (n_rows, width) for f, width in long_widths.items()},
        }
        files = {name: np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=DTYPE, shape=shape)
                 for name, shape in shapes.items()}
        users = pl.read_parquet(DataDir(data).users)
        start, n_targets = 0, 0
        for train_part, long_term_part in training_parts(data):
            rows = pl.read_parquet(train_part)
            joined = attach_context(rows, pl.read_parquet(long_term_part, columns=["session", *long_columns]), users)
            arrays = training_arrays(rows, session_width) | context_arrays(joined, profile_fields, long_widths)
            for name, array in arrays.items():
                files[name][start:start + rows.height] = array
            start += rows.height
            n_targets += int((arrays["targets"] > 0).sum())
        for array in files.values():
            array.flush()
        return {"rows": n_rows, "targets": n_targets, "shapes": {name: list(shape) for name, shape in shapes.items()}}

    return build


class DamagedStore(Exception):
    """A file of the store that does not hold what its manifest says; the message names it and how."""


def ensure_training_tensors(data: Path, profile_fields: list[str], long_features: list[str],
                            vocab: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The checked arrays (see `checked_arrays`) and the manifest of DATA/tensors/train, built first
    if missing or stale, and rebuilt if damaged: the store is a cache of the Parquet splits."""
    parent = DataDir(data).tensors
    expected = fingerprint(data)
    damage = None
    if is_current(parent / TRAIN, expected):
        try:
            return checked_arrays(parent / TRAIN, vocab), read_manifest(parent / TRAIN)
        except DamagedStore as found:
            damage = found
    try:
        parent.mkdir(exist_ok=True)
        lock = FileLock(parent / f".{TRAIN}.lock")
        lock.acquire()
    except PermissionError:
        reason = f"{damage}; sdm train rebuilds it, but " if damage else ""
        raise InputError(f"{reason}{parent}: cannot write the training tensors here; sdm train needs write access to {data}") from None
    try:
        if is_current(parent / TRAIN, expected):  # another process may have built it while we waited
            try:
                return checked_arrays(parent / TRAIN, vocab), read_manifest(parent / TRAIN)
            except DamagedStore:
                pass  # still the damaged store: rebuilt below
        build_stage(parent, TRAIN, expected, build_training_tensors(data, profile_fields, long_features))
    finally:
        lock.release()
    try:
        return checked_arrays(parent / TRAIN, vocab), read_manifest(parent / TRAIN)
    except DamagedStore as still:  # built from undamaged splits, so their ids are beyond the vocabularies
        raise InputError(f"{still}, as rebuilt from {data / 'splits'}; rebuild the data with `sdm preprocess LOGS --out {data} --force`") from None


def id_ranges(shapes: dict[str, list[int]], vocab: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """[low, high) of the values of each array: an id below its vocabulary's size (0 = padding),
    a length from 1 to the session width; profile columns each below their field's size."""
    width = shapes["items"][1]
    ranges: dict[str, tuple[Any, Any]] = {
        "items": (0, vocab["item"]), "targets": (0, vocab["item"]), "lengths": (1, width + 1), "user": (0, vocab["user"]),
        "profile": (np.zeros(len(vocab["profile"]), dtype=np.int64), np.asarray(vocab["profile"], dtype=np.int64)),
    }
    return ranges | {name: (0, vocab[name.removeprefix("long_")]) for name in shapes if name.startswith("long_")}


def checked_arrays(directory: Path, vocab: dict[str, Any]) -> dict[str, np.ndarray]:
    """Every array of the store, mapped (map_array) after checking it against the manifest: a .npy
    header of int32 in C order with the manifest's shape, the same number of rows in every array,
    a file exactly as long as that shape needs, and values in their id ranges (one min and one
    max per array, over the mapped pages). `vocab`: the size of each id's vocabulary ("item",
    "user", each long-term feature, and "profile": one size per field). A damaged store raises
    DamagedStore naming the file."""
    stats = (read_manifest(directory) or {}).get("stats", {})
    shapes = stats.get("shapes")
    needed = {"items", "targets", "lengths", "user", "profile"}
    if not isinstance(shapes, dict) or not needed <= set(shapes) or not all(
        isinstance(shape, list) and shape and all(isinstance(size, int) and size >= 0 for size in shape) for shape in shapes.values()
    ) or not isinstance(stats.get("targets"), int) or not {name.removeprefix("long_") for name in shapes if name.startswith("long_")} <= set(vocab):
        raise DamagedStore(f"{directory / MANIFEST}: not the manifest of a training store")
    rows = {shape[0] for shape in shapes.values()}
    if len(rows) != 1:
        raise DamagedStore(f"{directory / MANIFEST}: its arrays have different numbers of rows")
    arrays = {}
    for name, (low, high) in id_ranges(shapes, vocab).items():
        path = directory / f"{name}.npy"
        array = map_array(path)
        if array.dtype != DTYPE or tuple(array.shape) != tuple(shapes[name]) or not array.flags.c_contiguous:
            raise DamagedStore(f"{path}: holds {array.dtype} {list(array.shape)}, not the int32 {shapes[name]} of its manifest")
        if array.size:
            # one pass each for the least and the greatest value; per column for the profile fields
            smallest, largest = (array.min(axis=0), array.max(axis=0)) if name == "profile" else (array.min(), array.max())
            if np.any(smallest < low) or np.any(largest >= high):
                raise DamagedStore(f"{path}: holds values from {np.min(smallest)} to {np.max(largest)}, outside the ids of its vocabulary "
                                   f"([{np.min(low)}, {np.max(high)}))")
        arrays[name] = array
    return arrays


def map_array(path: Path) -> np.ndarray:
    """A .npy file as an array backed by the file's pages, not by private memory; a file that is
    no .npy, or shorter or longer than its header says, raises DamagedStore.

    Mapped copy-on-write, which gives torch the writable array it expects without copying, and
    advised as randomly accessed: batches read scattered rows, and the kernel's readahead
    (8 MB per fault on some virtual disks) would otherwise read most of a file for one batch."""
    try:
        with open(path, "rb") as handle:
            read_header = HEADER_READERS[np.lib.format.read_magic(handle)]
            shape, fortran_order, dtype = read_header(handle)
            offset = handle.tell()
            if dtype.hasobject:  # Python objects: pickled, not numbers to map
                raise DamagedStore(f"{path}: holds Python objects, not numbers")
            size = os.fstat(handle.fileno()).st_size
            expected = offset + math.prod(shape) * dtype.itemsize
            if size != expected:
                raise DamagedStore(f"{path}: {size:,} bytes, but its header's {dtype} {list(shape)} needs {expected:,}")
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as error:
        raise DamagedStore(f"{path}: unreadable ({error.strerror})") from None
    except (ValueError, KeyError):  # no .npy magic, an unknown version or a header numpy cannot parse
        raise DamagedStore(f"{path}: not a .npy file") from None
    if hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)
    count = int(np.prod(shape))
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran_order else "C")


def map_tensors(directory: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """directory/<name>.npy as memory-mapped tensors (map_array)."""
    return {name: torch.from_numpy(map_array(directory / f"{name}.npy")) for name in names}


def open_training_tensors(data: Path, profile_fields: list[str], long_features: list[str],
                          vocab: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
    """(memory-mapped int32 tensors of the training split, number of targets); see ensure_training_tensors."""
    arrays, manifest = ensure_training_tensors(data, profile_fields, long_features, vocab)
    return {name: torch.from_numpy(array) for name, array in arrays.items()}, manifest["stats"]["targets"]
