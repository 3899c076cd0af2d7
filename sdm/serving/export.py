"""`sdm export`: what a serving system needs from a trained run, in one directory.

    items.parquet        id (raw item id), vector [d]: the items' side of the inner product
    users.parquet        id (raw user id), vector [d]: every user's vector after their latest session
    user_tower.onnx      the user tower (inputs below -> user_vector [B, d]); with --format
                         torchscript, user_tower.pt instead
    index.faiss          with --index flat|hnsw|ivf: a faiss index over the items (sdm.serving.ann: flat
                         searches the inner product, hnsw and ivf an equivalent Euclidean space;
                         the parameters, IndexParams, are in the manifest and the file),
    index_ids.parquet    and its id map: position -> item (dense id, raw id)
    manifest.json        the run's fingerprint, model, dims, vocab sizes, tower inputs, the index,
                         package versions, and how far onnxruntime was from PyTorch at export

The directory is built under a hidden temporary name next to its target and renamed into place
when complete (pipeline.storage.publish_directory): a reader finds the previous export or the new
one, never a mix.

Tower inputs, all int64: items [B, T] (0-padded on the right), lengths [B], profile [B, P],
user [B], and long_<feature> [B, L_f] for each long-term feature (0-padded); B, T and every L_f
are dynamic.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import platform
import shutil
import uuid
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from pipeline.cache import file_digest
from pipeline.contract import DataDir
from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir, publish_directory, write_json_atomic
from sdm.serving.ann import INDEX_KINDS, IndexParams, build_index, index_params
from sdm.training.checkpoint import BEST
from sdm.data.sessions import Batch, Catalogue, SessionData, input_tensors
from sdm.evaluation.evaluate import embed_cases
from sdm.models.base import Recommender
from sdm.serving.recommend import latest_sessions

FORMATS = ("onnx", "torchscript")
TOWER_FILES = {"onnx": "user_tower.onnx", "torchscript": "user_tower.pt"}
MANIFEST = "manifest.json"
INDEX_FILE, INDEX_IDS = "index.faiss", "index_ids.parquet"
EXPORT_KIND = "sdm-export"
# onnxruntime and PyTorch run different kernels (fused LSTM, attention): float32 rounding only,
# measured at 3e-7 on the sample run's users; anything past this is a wrong graph.
ONNX_TOLERANCE = 1e-4
CHECKED_USERS = 256  # users whose vectors the export recomputes with onnxruntime
VERSIONED_PACKAGES = ("sdm", "torch", "numpy", "polars", "onnx", "onnxscript", "onnxruntime", "faiss-cpu")


class UserTower(nn.Module):
    """The user side of a model with plain tensor arguments, for ONNX export and TorchScript tracing."""

    def __init__(self, model: Recommender, long_features: list[str]):
        super().__init__()
        self.model = model
        self.long_features = long_features

    def forward(self, items: Tensor, lengths: Tensor, profile: Tensor, user: Tensor, *long_sets: Tensor) -> Tensor:
        batch: Batch = {"items": items, "lengths": lengths, "profile": profile, "user": user}
        for feature, values in zip(self.long_features, long_sets):
            batch[f"long_{feature}"] = values
        return self.model.user_vectors(batch)  # [B, d]


def tower_input_names(long_features: list[str]) -> list[str]:
    return ["items", "lengths", "profile", "user", *(f"long_{f}" for f in long_features)]


def tower_arguments(batch: Batch, long_features: list[str]) -> tuple[Tensor, ...]:
    return tuple(batch[name] for name in tower_input_names(long_features))


def run_fingerprint(run: Path, run_config: dict[str, Any]) -> str:
    """Identifies the exact model a run serves: its best checkpoint's content and its data."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(file_digest(run / BEST).encode())
    digest.update(str(run_config.get("data_fingerprint")).encode())
    return digest.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of what produced and what reads the export (None: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def export_run(
    model: Recommender,
    run: Path,
    run_config: dict[str, Any],
    catalogue: Catalogue,
    out: Path,
    fmt: str = "onnx",
    index: str | None = None,
    params: IndexParams = IndexParams(),
) -> dict[str, Any]:
    """Write the export directory `out` (see the module docstring); returns its manifest."""

    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if index is not None and index not in INDEX_KINDS:
        raise InputError(f"--index {index!r}: expected one of {', '.join(INDEX_KINDS)}")
    check_target(out)
    data = Path(run_config["train"]["data"])
    model.eval()
    item_vocab = pl.read_parquet(DataDir(data).vocabulary("item"))
    user_vocab = pl.read_parquet(DataDir(data).vocabulary("user"))
    with torch.no_grad():
        all_items = model.item_vectors().detach().float()  # [n_items, d], row 0 = padding
    rows = latest_sessions(data)
    inputs = SessionData(input_tensors(rows, data, catalogue))
    user_vectors = embed_cases(model, inputs)
    raw_users = rows.select("user").join(user_vocab.select(pl.col("id").alias("user"), "raw"), on="user", how="left")
    item_ids = item_vocab.get_column("id").to_numpy().astype(np.int64)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        vector_frame(item_vocab.get_column("raw"), all_items[item_ids]).write_parquet(staging / "items.parquet")
        vector_frame(raw_users.get_column("raw"), user_vectors).write_parquet(staging / "users.parquet")
        tower = UserTower(model, catalogue.long_features).eval()
        tower_path = staging / TOWER_FILES[fmt]
        if fmt == "onnx":
            write_onnx(tower, catalogue, tower_path)
            difference = onnx_difference(tower_path, model, inputs, catalogue)
            if difference > ONNX_TOLERANCE:
                raise RuntimeError(f"onnxruntime's user vectors differ from PyTorch's by {difference:.3g} (> {ONNX_TOLERANCE})")
        else:
            write_torchscript(tower, inputs, catalogue, tower_path)
            difference = None
        index_entry = write_index(all_items, index, params, item_vocab, staging) if index is not None else None
        manifest = {
            "kind": EXPORT_KIND,
            "run": str(run.resolve()),
            "fingerprint": run_fingerprint(run, run_config),
            "data_fingerprint": run_config.get("data_fingerprint"),
            "model": run_config["train"]["model"],
            "dim": int(all_items.shape[1]),
            "items": int(len(item_ids)),
            "users": int(user_vectors.shape[0]),
            "vocab": catalogue.vocab_sizes() | {"long_features": catalogue.long_features},
            "tower": {
                "format": fmt,
                "file": TOWER_FILES[fmt],
                "inputs": tower_input_names(catalogue.long_features),
                "output": "user_vector",
                "dynamic": {"items": ["batch", "length"], **{f"long_{f}": ["batch", f"long_{f}"] for f in catalogue.long_features}},
                "onnx_max_abs_difference": difference,
            },
            "index": index_entry,
            "versions": package_versions(),
        }
        write_json_atomic(staging / MANIFEST, manifest)
        publish_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def check_target(out: Path) -> None:
    """The export replaces `out` as a whole, so it must be an earlier export, empty or absent."""
    ensure_output_dir(out, create=False)
    if out.is_dir() and any(out.iterdir()) and read_export_manifest(out) is None:
        raise InputError(f"{out}: exists and is not an sdm export; choose an empty or new directory with --out")


def read_export_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("kind") == EXPORT_KIND else None


def vector_frame(ids: pl.Series, vectors: Tensor) -> pl.DataFrame:
    return pl.DataFrame({"id": ids, "vector": vectors.numpy().astype(np.float32)})


def example_batch(catalogue: Catalogue, dim_sizes: dict[str, int]) -> Batch:
    """A batch for tracing in which every dynamic dimension has its own size, none 0 or 1: the
    exporter takes equal example sizes for one symbol and would tie them in the graph."""
    batch, length = dim_sizes["batch"], dim_sizes["length"]
    generator = torch.Generator().manual_seed(0)
    example: Batch = {
        "items": torch.randint(1, catalogue.n_items, (batch, length), generator=generator),
        "lengths": torch.arange(length, length - batch, -1).clamp(min=1),
        "profile": torch.zeros(batch, len(catalogue.profile_fields), dtype=torch.long),
        "user": torch.zeros(batch, dtype=torch.long),
    }
    example["items"][torch.arange(length) >= example["lengths"].unsqueeze(1)] = 0
    for feature in catalogue.long_features:
        vocab = catalogue.n_items if feature == "item" else catalogue.side_vocab[feature]
        values = torch.randint(1, max(vocab, 2), (batch, dim_sizes[f"long_{feature}"]), generator=generator)
        values[:, -1] = 0  # padding in the sets too
        example[f"long_{feature}"] = values.clamp(max=vocab - 1)
    return example


def write_onnx(tower: UserTower, catalogue: Catalogue, path: Path) -> None:
    """torch.onnx.export (the dynamo exporter) with dynamic batch, session length and set widths."""
    try:
        import onnx  # noqa: F401  (the exporter needs it, and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        raise InputError('--format onnx needs onnx and onnxscript: pip install "sdm[serve]" (or use --format torchscript)') from None
    features = catalogue.long_features
    # Each dynamic dimension gets a size that no weight or the profile has: an example
    # length of 4 equal to a 4-wide embedding was fixed at 4 in the graph, and onnxruntime then
    # failed on every real session of another length.
    static = {size for tensor in tower.state_dict().values() for size in tensor.shape} | {len(catalogue.profile_fields)}
    free = (size for size in itertools.count(3) if size not in static)
    sizes = dict(zip(["batch", "length", *(f"long_{f}" for f in features)], free))
    example = example_batch(catalogue, sizes)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    dynamic_shapes = {
        "items": {0: batch, 1: length},
        "lengths": {0: batch},
        "profile": {0: batch},
        "user": {0: batch},
        "long_sets": tuple({0: batch, 1: torch.export.Dim(f"long_{f}")} for f in features),
    }
    buffer = io.StringIO()
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        # The exporter narrates its passes, warns about internals (LSTM weights it re-registers)
        # and logs the torchvision operators it cannot register: nothing the user can act on.
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                tower, tower_arguments(example, features), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=tower_input_names(features), output_names=["user_vector"], verbose=False,
            )
        finally:
            exporter_log.setLevel(level)
        program.save(str(path))


def onnx_difference(path: Path, model: Recommender, inputs: SessionData, catalogue: Catalogue) -> float:
    """Largest |onnxruntime - PyTorch| over the user vectors of some real users, batched together."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = inputs.batch(torch.arange(min(len(inputs), CHECKED_USERS)))
    feeds = dict(zip(tower_input_names(catalogue.long_features), (t.numpy() for t in tower_arguments(batch, catalogue.long_features))))
    with torch.no_grad():
        expected = model.user_vectors(batch).numpy()
    return float(np.abs(session.run(None, feeds)[0] - expected).max())


def write_torchscript(tower: UserTower, inputs: SessionData, catalogue: Catalogue, path: Path) -> None:
    example = inputs.batch(torch.arange(min(len(inputs), 8)))
    with torch.no_grad(), warnings.catch_warnings():
        # shapes are symbolic in the trace; the warning is about a fixed 3-way unpack (q, k, v)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(tower, tower_arguments(example, catalogue.long_features), check_trace=False)
    torch.jit.save(traced, str(path))


def write_index(all_items: Tensor, kind: str, params: IndexParams, item_vocab: pl.DataFrame, directory: Path) -> dict[str, Any]:
    """The faiss index over items[1:] and its position -> item map; the manifest's index entry."""
    import faiss

    index = build_index(all_items, kind, params)
    (directory / INDEX_FILE).write_bytes(faiss.serialize_index(index).tobytes())
    positions = np.arange(index.ntotal, dtype=np.int64)
    raw_of = item_vocab.sort("id").get_column("raw")
    pl.DataFrame({"position": positions, "item": positions + 1, "raw": raw_of}).write_parquet(directory / INDEX_IDS)
    space = "inner_product" if kind == "flat" else "euclidean, items with sqrt(R^2 - |x|^2) appended, queries with 0 (sdm.serving.ann)"
    return {"kind": kind, "file": INDEX_FILE, "ids": INDEX_IDS, "metric": "inner_product", "search_space": space,
            "size": int(index.ntotal), "params": index_params(index)}
