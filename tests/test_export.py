"""`sdm export`: item and user vectors in raw ids, the user tower as ONNX (equal to PyTorch within a
stated tolerance for many batch sizes and session lengths) or TorchScript, faiss indexes with their
id map, the manifest, and a directory that is replaced whole or not at all."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sdm.data.sessions import SessionData
from sdm.serving.export import run_fingerprint, tower_arguments, tower_input_names
from sdm.evaluation.retrieval import top_k
from sdm.training.train import load_trained
from helpers.cli import run_sdm, run_sdm_ok
from helpers.serving import latest_session_inputs
from helpers.training import TEST_THREADS, read_json, read_vocab

torch.set_num_threads(TEST_THREADS)

# onnxruntime and PyTorch run different kernels; on vectors of norm ~1-10 they agree to float32
# rounding (3e-7 measured). The bound is 30x that and far below any real difference.
ONNX_ATOL = ONNX_RTOL = 1e-5


@pytest.fixture(scope="module")
def trained(sample_run):
    model, run_config, catalogue = load_trained(sample_run.path)
    return model, run_config, catalogue


@pytest.fixture(scope="module")
def exported(sample_run, tmp_path_factory) -> Path:
    """The default export (ONNX) with an HNSW index."""
    out = tmp_path_factory.mktemp("export") / "out"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--index", "hnsw")
    return out


@pytest.fixture(scope="module")
def exported_torchscript(sample_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export_ts") / "out"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--format", "torchscript", "--index", "flat")
    return out


@pytest.fixture(scope="module")
def everyone(exported, sample_run, trained) -> SessionData:
    """Every exported user's inputs after their latest session, in the order of users.parquet."""
    _, _, catalogue = trained
    users = pl.read_parquet(exported / "users.parquet")
    id_of = dict(read_vocab(sample_run.data, "user").select("raw", "id").iter_rows())
    return latest_session_inputs(sample_run.data, catalogue, [id_of[raw] for raw in users.get_column("id").to_list()])


def test_export_writes_item_vectors_in_raw_ids(exported, sample_run, trained):
    model, _, _ = trained
    items = pl.read_parquet(exported / "items.parquet")
    vocab = read_vocab(sample_run.data, "item")
    assert items.get_column("id").to_list() == vocab.get_column("raw").to_list()
    with torch.no_grad():
        expected = model.item_vectors()[torch.from_numpy(vocab.get_column("id").to_numpy().astype(np.int64))]
    assert torch.equal(torch.from_numpy(items.get_column("vector").to_numpy().copy()), expected)


def test_export_writes_every_users_current_vector(exported, sample_run, trained, everyone):
    model, _, _ = trained
    users = pl.read_parquet(exported / "users.parquet")
    with_sessions = set(pl.read_parquet(sample_run.data / "sessions" / "sessions.parquet").get_column("user").to_list())
    assert users.height == len(with_sessions) == read_json(exported / "manifest.json")["users"]
    assert set(everyone.tensors["user"].tolist()) == with_sessions
    with torch.no_grad():
        expected = model.user_vectors(everyone.batch(torch.arange(len(everyone))))
    # Batched with different padding than the export, hence float rounding only.
    torch.testing.assert_close(torch.from_numpy(users.get_column("vector").to_numpy().copy()), expected, rtol=1e-5, atol=1e-6)


def tower_batches(inputs: SessionData) -> dict[str, dict[str, torch.Tensor]]:
    """Batches unlike the export's example (3 rows of 4 items): other sizes, session lengths, set widths."""
    lengths = inputs.tensors["lengths"]
    longest = torch.argsort(lengths, descending=True, stable=True)
    everyone = inputs.batch(torch.arange(len(inputs)))
    wider_sets = {
        name: torch.cat([values, torch.zeros(values.shape[0], 7, dtype=values.dtype)], dim=1)
        for name, values in everyone.items() if name.startswith("long_")
    }
    batches = {
        "one short session": inputs.batch(longest[-1:]),
        "one longest session": inputs.batch(longest[:1]),
        "three longest sessions": inputs.batch(longest[:3]),
        "everyone": everyone,
        "everyone, wider long-term sets": everyone | wider_sets,
        "extra session padding": everyone | {"items": torch.cat([everyone["items"], torch.zeros_like(everyone["items"])], dim=1)},
    }
    generator = torch.Generator().manual_seed(0)
    for size in (2, 5, 17, 64, 200):
        batches[f"{size} random users"] = inputs.batch(torch.randperm(len(inputs), generator=generator)[:size])
    return batches


def test_onnx_user_tower_equals_pytorch_for_many_batch_sizes_and_session_lengths(exported, trained, everyone):
    import onnxruntime

    model, _, catalogue = trained
    session = onnxruntime.InferenceSession(str(exported / "user_tower.onnx"), providers=["CPUExecutionProvider"])
    names = tower_input_names(catalogue.long_features)
    assert [node.name for node in session.get_inputs()] == names
    batches = tower_batches(everyone)
    shapes = {tuple(tuple(tensor.shape) for tensor in batch.values()) for batch in batches.values()}
    assert len(shapes) == len(batches)  # every batch has shapes of its own
    for name, batch in batches.items():
        feeds = dict(zip(names, (tensor.numpy() for tensor in tower_arguments(batch, catalogue.long_features))))
        from_onnx = torch.from_numpy(session.run(None, feeds)[0])
        with torch.no_grad():
            from_model = model.user_vectors(batch)
        assert from_onnx.shape == from_model.shape, name
        torch.testing.assert_close(from_onnx, from_model, rtol=ONNX_RTOL, atol=ONNX_ATOL, msg=name)
    assert read_json(exported / "manifest.json")["tower"]["onnx_max_abs_difference"] < ONNX_ATOL


def test_torchscript_user_tower_reproduces_the_model_exactly(exported_torchscript, trained, everyone):
    model, _, catalogue = trained
    tower = torch.jit.load(str(exported_torchscript / "user_tower.pt"))
    assert not (exported_torchscript / "user_tower.onnx").exists()
    for name, batch in tower_batches(everyone).items():
        with torch.no_grad():
            assert torch.equal(tower(*tower_arguments(batch, catalogue.long_features)), model.user_vectors(batch)), name


def index_and_ids(directory: Path):
    import faiss

    manifest = read_json(directory / "manifest.json")["index"]
    return manifest, faiss.read_index(str(directory / manifest["file"])), pl.read_parquet(directory / manifest["ids"])


def test_flat_index_finds_the_exact_top_k_and_its_id_map_names_the_items(exported_torchscript, sample_run, trained, everyone):
    from sdm.serving.ann import index_top_k

    model, _, _ = trained
    entry, index, ids = index_and_ids(exported_torchscript)
    vocab = read_vocab(sample_run.data, "item")
    assert entry["kind"] == "flat" and index.ntotal == vocab.height == entry["size"]
    raw_of = dict(vocab.select("id", "raw").iter_rows())
    assert ids.get_column("raw").to_list() == [raw_of[item] for item in ids.get_column("item").to_list()]
    assert ids.get_column("item").to_list() == [position + 1 for position in ids.get_column("position").to_list()]

    with torch.no_grad():
        queries = model.user_vectors(everyone.batch(torch.arange(len(everyone))))
        exact_scores, exact_ids = top_k(queries, model.item_vectors(), 20)
    scores, found = index_top_k(index, model.item_vectors(), queries, 20)
    assert torch.equal(found, exact_ids)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_hnsw_index_finds_nearly_all_of_the_exact_top_k(exported, trained, everyone):
    from sdm.serving.ann import IndexParams, index_top_k, overlap_recall

    model, _, _ = trained
    entry, index, _ = index_and_ids(exported)
    defaults = IndexParams()
    assert entry["kind"] == "hnsw"
    assert entry["params"] == {"M": defaults.M, "efConstruction": defaults.efConstruction, "efSearch": defaults.efSearch}
    with torch.no_grad():
        queries = model.user_vectors(everyone.batch(torch.arange(len(everyone))))
        exact_scores, exact = top_k(queries, model.item_vectors(), 50)
    scores, approximate = index_top_k(index, model.item_vectors(), queries, 50)
    assert overlap_recall(approximate, exact) >= 0.95
    # the index picks the items, their scores are the exact inner products, best first
    with torch.no_grad():
        rescored = (queries.unsqueeze(1) * model.item_vectors()[approximate]).sum(-1)
    torch.testing.assert_close(scores, rescored, rtol=1e-5, atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


@pytest.mark.parametrize(
    "kind, options, params",
    [
        ("hnsw", ("--hnsw-m", 8, "--ef-construction", 64, "--ef-search", 77), {"M": 8, "efConstruction": 64, "efSearch": 77}),
        ("ivf", ("--nlist", 16, "--nprobe", 6), {"nlist": 16, "nprobe": 6}),
    ],
)
def test_index_options_are_built_into_the_index_and_recorded(sample_run, trained, everyone, tmp_path, kind, options, params):
    from sdm.serving.ann import index_params, index_top_k, overlap_recall

    model, _, _ = trained
    out = tmp_path / "out"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--format", "torchscript", "--index", kind, *options)
    entry, index, _ = index_and_ids(out)
    assert entry["params"] == index_params(index) == params
    with torch.no_grad():
        queries = model.user_vectors(everyone.batch(torch.arange(len(everyone))))
        _, exact = top_k(queries, model.item_vectors(), 50)
    _, approximate = index_top_k(index, model.item_vectors(), queries, 50)
    assert overlap_recall(approximate, exact) >= 0.9  # even at these small settings


def test_manifest_records_the_run_dims_vocab_sizes_and_versions(exported, sample_run, trained):
    import onnxruntime

    _, run_config, catalogue = trained
    manifest = read_json(exported / "manifest.json")
    assert manifest["fingerprint"] == run_fingerprint(sample_run.path, run_config)
    assert manifest["model"] == "sdm" and manifest["dim"] == sample_run.config.dim
    assert manifest["items"] == catalogue.n_items - 1
    assert manifest["vocab"]["n_users"] == catalogue.n_users
    assert manifest["vocab"]["side_vocab"] == catalogue.side_vocab
    assert manifest["vocab"]["profile_vocab"] == catalogue.profile_vocab
    assert manifest["tower"]["inputs"] == tower_input_names(catalogue.long_features)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["onnxruntime"] == onnxruntime.__version__


def test_fingerprint_changes_with_the_model(sample_run, trained, tmp_path):
    _, run_config, _ = trained
    copy = Path(shutil.copytree(sample_run.path, tmp_path / "run"))
    before = run_fingerprint(copy, run_config)
    (copy / "best.pt").write_bytes((copy / "last.pt").read_bytes() + b"\0")
    assert run_fingerprint(copy, run_config) != before


def visible(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


def test_a_new_export_replaces_the_old_one_whole(sample_run, tmp_path):
    out = tmp_path / "export"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--format", "torchscript", "--index", "flat")
    assert "index.faiss" in visible(out)
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--format", "torchscript")
    assert visible(out) == ["items.parquet", "manifest.json", "user_tower.pt", "users.parquet"]
    assert read_json(out / "manifest.json")["index"] is None
    assert visible(tmp_path) == ["export"]  # no temporaries left beside it


def test_a_failed_export_leaves_the_previous_one(sample_run, tmp_path, monkeypatch):
    import sdm.serving.export

    out = tmp_path / "export"
    run_sdm_ok("export", "--run", sample_run.path, "--out", out, "--format", "torchscript")
    before = {name: (out / name).read_bytes() for name in visible(out)}

    def broken_index(*args, **kwargs):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(sdm.serving.export, "write_index", broken_index)
    outcome = run_sdm("export", "--run", sample_run.path, "--out", out, "--format", "torchscript", "--index", "flat")
    assert outcome.exit_code != 0
    assert {name: (out / name).read_bytes() for name in visible(out)} == before
    assert visible(tmp_path) == ["export"]


@pytest.mark.parametrize(
    "options, message",
    [
        (("--format", "pickle"), "--format"),
        (("--index", "annoy"), "--index"),
        (("--index", "hnsw", "--ef-search", "0"), "--ef-search"),
        (("--index", "hnsw", "--hnsw-m", "-2"), "--hnsw-m"),
        (("--index", "ivf", "--nlist", "4", "--nprobe", "5"), "--nprobe"),
    ],
)
def test_bad_export_options_are_refused_in_one_line(sample_run, tmp_path, options, message):
    outcome = run_sdm("export", "--run", sample_run.path, "--out", tmp_path / "out", *options)
    assert outcome.exit_code == 2
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_replace_a_directory_that_is_not_an_export(sample_run, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    outcome = run_sdm("export", "--run", sample_run.path, "--out", tmp_path / "mine")
    assert outcome.exit_code == 2
    assert len(outcome.stderr.strip().splitlines()) == 1 and "not an sdm export" in outcome.stderr
    assert visible(tmp_path / "mine") == ["notes.txt"]
