"""Preprocessing in user buckets (issue "Scale", preprocessing beyond memory): any number of
buckets gives the same tables as the in-memory path; bucket jobs (--bucket K/N) are cached and
a final run publishes them; logs of several files read as one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from helpers.cli import run_sdm
from helpers.logs import KEEP_ALL_ITEMS, preprocess, snapshot, stage_states, write_log
from helpers.training import SAMPLE_FILES

from pipeline.buckets import TYPED_EVENT_BYTES, bucket_count, parse_bucket
from pipeline.config import PreprocessConfig, parse_size
from pipeline.errors import InputError
from pipeline.events import EVENT_SCHEMA
from pipeline.run import run_preprocess

TABLES = (
    "events/events", "events/items", "events/users", "sessions/events", "sessions/sessions",
    "long_term/long_term", "splits/train", "splits/valid", "splits/test",
)


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by every non-list column: the order of rows is the one thing buckets change."""
    return frame.sort([name for name, dtype in frame.schema.items() if not isinstance(dtype, pl.List)])


def tables(out: Path) -> dict[str, pl.DataFrame]:
    names = [*TABLES, *(f"events/vocab/{path.stem}" for path in sorted((out / "events" / "vocab").glob("*.parquet")))]
    return {name: canonical(pl.read_parquet(out / f"{name}.parquet")) for name in names}


def assert_same_tables(actual: Path, expected: Path) -> None:
    expected_tables = tables(expected)
    actual_tables = tables(actual)
    assert actual_tables.keys() == expected_tables.keys()
    for name, frame in expected_tables.items():
        assert frame.height > 0 or name.startswith("splits"), name
        assert actual_tables[name].equals(frame), name


def sample_config(out: Path, **overrides: object) -> PreprocessConfig:
    return PreprocessConfig(
        logs=SAMPLE_FILES["events"], items=SAMPLE_FILES["items"], users=SAMPLE_FILES["users"], out=out, **overrides
    )


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("buckets") / "one"
    run_preprocess(sample_config(out, buckets=1))
    return out


# --- same output for any number of buckets --------------------------------------------------------


@pytest.mark.parametrize("n_buckets", [4, 7])
def test_buckets_give_the_in_memory_tables(in_memory: Path, tmp_path: Path, n_buckets: int) -> None:
    out = tmp_path / f"n{n_buckets}"
    run_preprocess(sample_config(out, buckets=n_buckets))
    parts = sorted(path.name for path in (out / "sessions" / "sessions.parquet").iterdir())
    assert parts == [f"part-{bucket:05d}.parquet" for bucket in range(n_buckets)]
    assert_same_tables(out, in_memory)
    for stage in ("events", "sessions", "long_term", "splits"):
        expected = json.loads((in_memory / stage / "manifest.json").read_text())["stats"]
        actual = json.loads((out / stage / "manifest.json").read_text())["stats"]
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert actual[name] == (pytest.approx(value) if isinstance(value, float) else value), (stage, name)


def test_sessions_are_numbered_zero_to_n_in_user_time_order(tmp_path: Path) -> None:
    """Bucket by bucket, session numbers stay the global ones: dense, and increasing along each
    user's events in (user, time) order."""
    out = tmp_path / "out"
    run_preprocess(sample_config(out, buckets=5))
    sessions = pl.read_parquet(out / "sessions" / "sessions.parquet").sort("session")
    assert sessions.get_column("session").to_list() == list(range(sessions.height))
    assert_user_time_order(sessions, "start")
    events = pl.read_parquet(out / "events" / "events.parquet").sort("order")
    assert events.get_column("order").to_list() == list(range(events.height))
    assert_user_time_order(events, "time")


def assert_user_time_order(frame: pl.DataFrame, time: str) -> None:
    """Rows in (user, time) order: users never decrease, and times never decrease within a user."""
    user_step, time_step = pl.col("user").cast(pl.Int64).diff(), pl.col(time).diff()
    backwards = frame.filter((user_step < 0) | ((user_step == 0) & (time_step < 0)))
    assert backwards.height == 0, backwards


def test_more_buckets_than_users(tmp_path: Path) -> None:
    rows = [("u1", "a", 1_700_000_000_000), ("u1", "b", 1_700_000_060_000), ("u2", "a", 1_700_000_000_000),
            ("u2", "c", 1_700_090_000_000), ("u2", "b", 1_700_090_060_000)]
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "one", *KEEP_ALL_ITEMS, "--buckets", "1", "--split", "leave-last-out")
    preprocess(logs, tmp_path / "many", *KEEP_ALL_ITEMS, "--buckets", "9", "--split", "leave-last-out")
    assert_same_tables(tmp_path / "many", tmp_path / "one")


def test_readers_of_the_model_see_one_table(in_memory: Path, tmp_path: Path) -> None:
    from sdm.data.sessions import load_cases, load_catalogue, load_training

    out = tmp_path / "out"
    run_preprocess(sample_config(out, buckets=3))
    one, many = load_catalogue(in_memory), load_catalogue(out)
    assert torch.equal(one.item_counts, many.item_counts) and torch.equal(one.item_side, many.item_side)
    assert len(load_training(out, many)) == len(load_training(in_memory, one))
    cases_one, keys_one = load_cases(in_memory, one, "test")
    cases_many, keys_many = load_cases(out, many, "test")
    assert len(cases_many) == len(cases_one)
    assert canonical(keys_many).equals(canonical(keys_one))


# --- bucket jobs ----------------------------------------------------------------------------------


def part_files(out: Path, bucket: int) -> list[Path]:
    return sorted(path for path in (out / "buckets").glob(f"*/part-{bucket:05d}/*") if path.is_file())


def test_bucket_jobs_then_a_final_run(in_memory: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    files = ["--items", SAMPLE_FILES["items"], "--users", SAMPLE_FILES["users"]]
    for bucket in (0, 2):  # bucket 1's job never ran
        outcome = preprocess(SAMPLE_FILES["events"], out, *files, "--bucket", f"{bucket}/3")
        assert f"sessions {bucket}/3" in outcome.stdout
    assert not (out / "sessions").exists()  # nothing published by a bucket job
    assert part_files(out, 1) == []
    built = snapshot(part_files(out, 0) + part_files(out, 2))
    assert len(built) == 2 * 9  # sessions (2 tables), long_term (1), splits (3), each with a manifest

    again = preprocess(SAMPLE_FILES["events"], out, *files, "--bucket", "2/3")
    assert "built" not in again.stdout  # the global step and bucket 2 are cached

    final = preprocess(SAMPLE_FILES["events"], out, *files, "--buckets", "3")
    assert stage_states(final.stdout) == {"events": "cached", "sessions": "built", "long_term": "built", "splits": "built"}
    assert snapshot(built) == built  # the jobs' parts were linked, not rebuilt
    assert len(part_files(out, 1)) == 9  # the missing bucket was built by the final run
    assert_same_tables(out, in_memory)

    rerun = preprocess(SAMPLE_FILES["events"], out, *files, "--buckets", "3")
    assert set(stage_states(rerun.stdout).values()) == {"cached"}


def test_changed_parameter_rebuilds_its_stage_in_every_bucket(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_preprocess(sample_config(out, buckets=3))
    sessions_parts = snapshot(sorted((out / "buckets" / "sessions").rglob("*.parquet")))
    reports = run_preprocess(sample_config(out, buckets=3, max_long=3))
    assert {report.name: report.cached for report in reports} == {
        "events": True, "sessions": True, "long_term": False, "splits": True}
    assert snapshot(sessions_parts) == sessions_parts
    lengths = pl.read_parquet(out / "long_term" / "long_term.parquet").get_column("long_item").list.len()
    assert lengths.max() == 3


def test_another_number_of_buckets_is_another_layout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_preprocess(sample_config(out, buckets=2))
    assert all(not report.cached for report in run_preprocess(sample_config(out, buckets=1)))
    assert (out / "sessions" / "sessions.parquet").is_file()


@pytest.mark.parametrize("text", ["3/3", "0/1", "-1/4", "a/b", "4"])
def test_bad_bucket_option(text: str) -> None:
    with pytest.raises(InputError, match="--bucket"):
        parse_bucket(text)


def test_bucket_and_buckets_must_agree(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="disagree"):
        run_preprocess(sample_config(tmp_path / "out", buckets=4), bucket=(0, 3))


# --- the memory rule ------------------------------------------------------------------------------


def test_typed_event_bytes_is_the_width_of_the_events_schema() -> None:
    width = {pl.UInt32: 4, pl.UInt64: 8, pl.Int64: 8}
    assert TYPED_EVENT_BYTES == sum(width[dtype] for dtype in EVENT_SCHEMA.values())


@pytest.mark.parametrize(
    ("rows", "limit", "expected"),
    [
        (1_000, 10**9, 1),  # 192 kB: everything in memory
        (10_000_000, 10**9, 2),  # 10M x 32 bytes x 6 = 1.92 GB
        (40_000_000, 2 * 10**9, 4),  # 7.68 GB
        (10_416_667, 10**9, 3),  # 2.000000064 GB: just over two buckets' worth
    ],
)
def test_bucket_count_rule(rows: int, limit: int, expected: int) -> None:
    assert bucket_count(rows, limit) == expected


@pytest.mark.parametrize(("text", "bytes_"), [("4GB", 4 * 10**9), ("512MiB", 512 * 2**20), ("2.5gb", 2_500_000_000), ("1000", 1000)])
def test_memory_limit_spellings(text: str, bytes_: int) -> None:
    assert parse_size(text, option="--memory-limit") == bytes_


def test_unreadable_memory_limit_is_one_line(tmp_path: Path) -> None:
    outcome = run_sdm("preprocess", SAMPLE_FILES["events"], "--out", tmp_path / "out", "--memory-limit", "lots")
    assert outcome.exit_code == 2 and "--memory-limit" in outcome.stderr and "Traceback" not in outcome.stderr


# --- logs of several files ------------------------------------------------------------------------


def split_sample(directory: Path, fmt: str) -> Path:
    """The sample log cut into three files whose names sort in the original row order."""
    directory.mkdir()
    log = pl.read_csv(SAMPLE_FILES["events"], infer_schema=False)
    for index, start in enumerate(range(0, log.height, math.ceil(log.height / 3))):
        part = log.slice(start, math.ceil(log.height / 3))
        if fmt == "csv":
            part.write_csv(directory / f"day-{index}.csv")
        else:
            part.write_parquet(directory / f"day-{index}.parquet")
    (directory / "_SUCCESS").write_text("")
    return directory


@pytest.mark.parametrize(("fmt", "as_glob"), [("csv", False), ("parquet", False), ("csv", True)])
def test_directory_or_glob_of_files_reads_as_one_log(in_memory: Path, tmp_path: Path, fmt: str, as_glob: bool) -> None:
    directory = split_sample(tmp_path / "logs", fmt)
    logs = directory / f"day-*.{fmt}" if as_glob else directory
    out = tmp_path / "out"
    n_buckets = 2 if fmt == "parquet" else 1
    run_preprocess(PreprocessConfig(logs=logs, items=SAMPLE_FILES["items"], users=SAMPLE_FILES["users"], out=out, buckets=n_buckets))
    assert_same_tables(out, in_memory)


def test_files_with_different_columns_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    write_log(directory / "a.csv", [("u1", "x", 1_700_000_000_000)])
    write_log(directory / "b.csv", [("u1", "x", 1_700_000_000_000)], header=("user", "sku", "time"))
    with pytest.raises(InputError, match="b.csv has columns"):
        run_preprocess(PreprocessConfig(logs=directory, out=tmp_path / "out", min_item_count=1))
    assert not (tmp_path / "out").exists()


def test_glob_matching_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no file matches"):
        run_preprocess(PreprocessConfig(logs=tmp_path / "*.csv", out=tmp_path / "out"))
