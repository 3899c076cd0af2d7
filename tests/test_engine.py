"""Preprocessing on Dask distributed (issue 16 section 4, `sdm preprocess --engine dask`): on a
local cluster of two worker processes the output is the in-memory path's; a worker killed in the
middle of a bucket is replaced, its task retried, and no half-written part is left; without the
extra, `--engine dask` is one line and exit code 2. One cluster serves the module (`--address`);
a slow test lets the command start its own, as `sdm preprocess --engine dask` does by default."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from helpers.cli import run_sdm
from helpers.engine import ATTEMPTS, MARKER, build_bucket_dying_once, build_bucket_refusing_bucket_0
from helpers.logs import STAGES, snapshot, write_log
from helpers.training import SAMPLE_FILES

import pipeline.run
from pipeline.cache import damaged_file, read_manifest
from pipeline.config import PreprocessConfig
from pipeline.engine import EngineOptions, engine_layout
from pipeline.errors import InputError
from pipeline.run import PER_USER_STAGES, STAGE, choose_layout, input_fingerprints, run_preprocess

N_BUCKETS = 4
STAGE_FILES = {name: stage.tables for name, stage in STAGE.items()}


def sample_config(out: Path, buckets: int) -> PreprocessConfig:
    return PreprocessConfig(logs=SAMPLE_FILES["events"], items=SAMPLE_FILES["items"], users=SAMPLE_FILES["users"], out=out, buckets=buckets)


def sample_options(*options: object) -> list[object]:
    return [SAMPLE_FILES["events"], "--items", SAMPLE_FILES["items"], "--users", SAMPLE_FILES["users"], *options]


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """The scheduler address of a local cluster of 2 worker processes, one thread each."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local.scheduler_address


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("engine") / "in-memory"
    run_preprocess(sample_config(out, buckets=1))
    return out


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same buckets built one after the other in this process, without an engine."""
    out = tmp_path_factory.mktemp("engine") / "sequential"
    run_preprocess(sample_config(out, buckets=N_BUCKETS))
    return out


def sorted_tables(out: Path) -> dict[str, pl.DataFrame]:
    """Every table of every stage (one file, or a directory of parts read as one), rows sorted:
    the order of rows is the one thing buckets change."""
    frames = {f"{stage}/{name}": pl.read_parquet(out / stage / f"{name}.parquet") for stage, names in STAGE_FILES.items() for name in names}
    return {name: frame.sort([column for column, dtype in frame.schema.items() if not isinstance(dtype, pl.List)]) for name, frame in frames.items()}


def assert_output_of_the_in_memory_path(out: Path, in_memory: Path, sequential: Path) -> None:
    expected = sorted_tables(in_memory)
    for name, frame in sorted_tables(out).items():
        assert frame.equals(expected[name]), name
    for stage in STAGES:
        assert read_manifest(out / stage)["stats"] == pytest.approx(read_manifest(in_memory / stage)["stats"]), stage
        # and byte for byte the manifest (fingerprints, every file's size and digest) of the run without an engine
        assert (out / stage / "manifest.json").read_bytes() == (sequential / stage / "manifest.json").read_bytes(), stage


def test_a_cluster_of_two_workers_gives_the_in_memory_output(cluster: str, in_memory: Path, sequential: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    reports = run_preprocess(sample_config(out, buckets=N_BUCKETS), engine=EngineOptions(address=cluster))
    assert [report.name for report in reports] == ["events", "buckets", *PER_USER_STAGES]
    assert reports[1].stats == {"engine": "dask", "slots": 2, "buckets": N_BUCKETS, "buckets_built": N_BUCKETS}
    assert_output_of_the_in_memory_path(out, in_memory, sequential)

    files = snapshot(path for path in out.rglob("*") if path.is_file() and not path.name.endswith(".lock"))
    again = run_preprocess(sample_config(out, buckets=N_BUCKETS), engine=EngineOptions(address=cluster))
    assert all(report.cached for report in again)
    assert snapshot(files) == files


def test_a_worker_killed_mid_bucket_is_retried_and_leaves_no_half_written_part(
    cluster: str, in_memory: Path, sequential: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_preprocess(sample_config(out, buckets=N_BUCKETS), engine=EngineOptions(address=cluster, build_bucket=build_bucket_dying_once))

    killed = int((tmp_path / MARKER).read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(killed, 0)  # that worker process is gone: the bucket was finished by another
    assert [path for path in out.rglob("*") if ".tmp-" in path.name or ".old-" in path.name] == []
    for part in (out / "buckets").glob("*/part-*"):
        assert damaged_file(part, read_manifest(part)) is None, part
    assert all(b"half a file" not in path.read_bytes() for path in out.rglob("*.parquet") if path.is_file())
    assert_output_of_the_in_memory_path(out, in_memory, sequential)


def test_bad_input_is_the_same_one_line_error_as_without_the_engine(cluster: str, tmp_path: Path) -> None:
    log = write_log(tmp_path / "log.csv", [("u1", "i1", "2024-01-01 10:00:00"), ("u1", "i2", "yesterday")])
    config = PreprocessConfig(logs=log, out=tmp_path / "out", buckets=2)
    with pytest.raises(InputError) as without_engine:
        run_preprocess(config)
    with pytest.raises(InputError) as on_the_engine:  # met by the global step's task, raised here
        run_preprocess(config, engine=EngineOptions(address=cluster))
    assert str(on_the_engine.value) == str(without_engine.value)


def test_bad_input_in_a_bucket_is_not_retried(cluster: str, tmp_path: Path) -> None:
    options = EngineOptions(address=cluster, build_bucket=build_bucket_refusing_bucket_0)
    with pytest.raises(InputError, match="bucket 0: bad input"):
        run_preprocess(sample_config(tmp_path / "out", buckets=N_BUCKETS), engine=options)
    assert len((tmp_path / ATTEMPTS).read_text().splitlines()) == 1  # would be 1 + RETRIES if retried


def test_buckets_are_sized_for_the_tasks_that_run_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = PreprocessConfig(logs=SAMPLE_FILES["events"], out=tmp_path / "out", memory_limit=2 * 10**9)
    inputs = input_fingerprints(config)
    assert engine_layout(config, inputs, slots=1).n_buckets == 2  # a small log: two buckets at least, not the in-memory path
    assert engine_layout(config, inputs, slots=3).n_buckets == 3  # and one per slot
    monkeypatch.setattr(pipeline.run, "count_rows", lambda *_: 10**8)  # 10^8 rows x 192 bytes: 10 buckets of 2 GB
    assert choose_layout(config, config.out, inputs).n_buckets == 10
    assert engine_layout(config, inputs, slots=2).n_buckets == 20  # two at once share the 2 GB
    assert engine_layout(PreprocessConfig(logs=config.logs, out=config.out, buckets=7), inputs, slots=2).n_buckets == 7


@pytest.mark.slow  # 3 s on a quiet machine (7 s under load): a cluster of its own, started and stopped by the command
def test_the_command_starts_a_local_cluster_by_default(in_memory: Path, sequential: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    out = tmp_path / "out"
    outcome = run_sdm("preprocess", *sample_options("--out", out, "--engine", "dask", "--workers", "2", "--buckets", N_BUCKETS))
    assert outcome.exit_code == 0, outcome.output
    assert "buckets" in outcome.stdout and "dask" in outcome.stdout
    assert_output_of_the_in_memory_path(out, in_memory, sequential)


def test_without_the_extra_engine_dask_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # `import distributed` now fails, as when it is not installed
    outcome = run_sdm("preprocess", *sample_options("--out", tmp_path / "out", "--engine", "dask"))
    assert outcome.exit_code == 2
    assert outcome.stderr.count("\n") == 1 and 'pip install "sdm[dask]"' in outcome.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--engine", "ray"), "--engine 'ray': expected one of dask"),
        (("--engine", "dask", "--buckets", "1"), "use --buckets 2 or more"),
        (("--engine", "dask", "--bucket", "1/3"), "use one of them"),
        (("--engine", "dask", "--address", "tcp://127.0.0.1:8786", "--workers", "2"), "has its own workers"),
        (("--engine", "dask", "--workers", "0"), "--workers must be from 1 to the"),
        (("--engine", "dask", "--workers", "100000"), "--workers must be from 1 to the"),
        (("--address", "tcp://127.0.0.1:8786"), "add --engine dask"),
    ],
)
def test_options_that_cannot_run_are_one_line(options: tuple[str, ...], message: str, tmp_path: Path) -> None:
    outcome = run_sdm("preprocess", *sample_options("--out", tmp_path / "out", *options))
    assert outcome.exit_code == 2
    assert outcome.stderr.count("\n") == 1 and message in outcome.stderr, outcome.stderr
    assert not (tmp_path / "out").exists()


def test_an_address_without_a_scheduler_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    outcome = run_sdm("preprocess", *sample_options("--out", tmp_path / "out", "--engine", "dask", "--address", "nonsense"))
    assert outcome.exit_code == 2
    assert outcome.stderr.count("\n") == 1 and "--address 'nonsense': no Dask scheduler answers there" in outcome.stderr, outcome.stderr
    assert not (tmp_path / "out").exists()
