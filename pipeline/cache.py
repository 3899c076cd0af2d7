"""Stage directories that are either complete or absent, and the fingerprints that decide reuse.

A stage is built in a hidden temporary directory next to its final place; its manifest is the
last file written, and the directory is renamed into place only then. A run killed at any moment
therefore leaves the old complete stage, or no stage, never one that looks complete but is not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pipeline.errors import InputError
from pipeline.storage import as_os_error, publish_directory, remove_leftovers, temporary_path, write_json_atomic

MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 22
# A stage's files are checked against their manifest before use: fully hashed up to this size,
# beyond it the first and last chunk (Parquet's magic bytes and footer) with the exact size.
FULL_HASH_BYTES = 4 * HASH_CHUNK


def package_version() -> str:
    try:
        return version("sdm")
    except PackageNotFoundError:
        return "unknown"


def file_digest(path: Path) -> str:
    """Content hash of a file (BLAKE2b): renaming or touching a file does not invalidate caches."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def quick_digest(path: Path) -> str:
    size = path.stat().st_size
    if size <= FULL_HASH_BYTES:
        return file_digest(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        digest.update(handle.read(HASH_CHUNK))
        handle.seek(size - HASH_CHUNK)
        digest.update(handle.read(HASH_CHUNK))
    return digest.hexdigest()


def file_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and quick digest of every file a stage wrote, by path relative to its directory."""
    return {
        str(path.relative_to(directory)): {"size": path.stat().st_size, "digest": quick_digest(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def damaged_file(stage_dir: Path, manifest: dict[str, Any]) -> str | None:
    """The first file of the stage that is missing or no longer matches its manifest, if any."""
    for name, record in manifest.get("files", {}).items():
        path = stage_dir / name
        try:
            if path.stat().st_size != record["size"] or quick_digest(path) != record["digest"]:
                return name
        except OSError:
            return name
    return None


# Manifest entries that readers turn into file names (vocab/<feature>.parquet, vocab/profile.<field>.parquet).
FILE_NAME_LISTS = ("side_features", "profile_fields", "features")


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The stage's manifest, parsed as data; None when absent, not JSON, or when it lists a name
    that would lead a reader outside the directory (a manifest the pipeline never writes)."""
    try:
        manifest = json.loads((stage_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    stats = manifest.get("stats") if isinstance(manifest, dict) else None
    names = [name for key in FILE_NAME_LISTS for name in (stats or {}).get(key, [])]
    if not isinstance(stats, dict) or not all(isinstance(name, str) and is_plain_name(name) for name in names):
        return None
    return manifest


def require_stage(data: Path, stage: str) -> dict[str, Any]:
    """The manifest of a complete, undamaged stage of a preprocess output, for its readers."""
    manifest = read_manifest(data / stage)
    if manifest is None:
        raise InputError(f"{data}: no complete '{stage}' stage; run `sdm preprocess LOGS --out {data}` first")
    damaged = damaged_file(data / stage, manifest)
    if damaged is not None:
        raise InputError(f"{data / stage / damaged}: damaged (missing, or its size or checksum differs from the manifest); "
                         f"rebuild it with `sdm preprocess LOGS --out {data} --force`")
    return manifest


def is_plain_name(name: str) -> bool:
    """Whether a name taken from data (a column, a manifest entry) can be part of one file name:
    no path separator, no NUL, not '.' or '..'."""
    return name not in ("", ".", "..") and not any(character in name for character in "/\\\0")


def manifest_digest(stage_dir: Path) -> str:
    return hashlib.blake2b((stage_dir / MANIFEST).read_bytes(), digest_size=16).hexdigest()


def is_current(stage_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """Built with these inputs and parameters, and its files as they were written (a damaged
    stage is rebuilt, never reused)."""
    manifest = read_manifest(stage_dir)
    return manifest is not None and manifest.get("fingerprint") == fingerprint and damaged_file(stage_dir, manifest) is None


def build_stage(
    parent: Path,
    name: str,
    fingerprint: dict[str, Any],
    build: Callable[[Path], dict[str, Any]],
) -> dict[str, Any]:
    """Run `build(tmp_dir) -> stats`, then publish tmp_dir as parent/name with its manifest."""
    remove_leftovers(parent, name)
    temporary = temporary_path(parent / name)
    temporary.mkdir(parents=True)
    try:
        stats = build(temporary)
        manifest = {
            "stage": name, "version": package_version(), "fingerprint": fingerprint, "stats": stats, "files": file_records(temporary),
        }
        write_json_atomic(temporary / MANIFEST, manifest)
        publish_directory(temporary, parent / name)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        failed_write = as_os_error(error, parent / name)
        if failed_write is not None:
            raise failed_write from None
        raise
    return manifest
