"""`sdm preprocess` as a command: caching, interrupted runs, bad input, `sdm info` and
`sdm inspect --json` (issue "Polars preprocessing")."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from helpers.cli import invoke, run_sdm
from helpers.logs import (
    BASE_MS,
    HOUR_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    STAGES,
    inspect_user,
    preprocess,
    snapshot,
    stage_frames,
    stage_states,
    stats,
    write_log,
)
from pipeline.cache import build_stage, read_manifest

LOG = [
    ("u1", "a", BASE_MS), ("u1", "b", BASE_MS + MINUTE_MS), ("u1", "a", BASE_MS + HOUR_MS),
    ("u1", "c", BASE_MS + HOUR_MS + MINUTE_MS), ("u2", "b", BASE_MS), ("u2", "c", BASE_MS + 2 * HOUR_MS),
]


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return write_log(tmp_path / "events.csv", LOG)


def all_states(state: str) -> dict[str, str]:
    return {stage: state for stage in STAGES}


def assert_same_frames(actual: dict[str, pl.DataFrame], expected: dict[str, pl.DataFrame]) -> None:
    assert actual.keys() == expected.keys()
    for name, frame in expected.items():
        assert actual[name].equals(frame), name


# --- caching --------------------------------------------------------------------------------------


def test_second_run_is_cached(tmp_path: Path, logs: Path) -> None:
    out = tmp_path / "out"
    assert stage_states(preprocess(logs, out, *KEEP_ALL_ITEMS).stdout) == all_states("built")
    files = snapshot(sorted(out.rglob("*.parquet")))
    assert stage_states(preprocess(logs, out, *KEEP_ALL_ITEMS).stdout) == all_states("cached")
    assert snapshot(files) == files


def test_an_option_added_later_leaves_data_built_before_it_current(tmp_path: Path, logs: Path) -> None:
    # Data built before --items-columns existed has no such key in its fingerprint. Left unset, the
    # option adds none, so that upgrading sdm neither rebuilds that data nor orphans the runs
    # trained on it (a run names its data by the manifests' digests).
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert not {"items_columns", "users_columns"} & set(read_manifest(tmp_path / "out" / "events")["fingerprint"]["params"])
    items = write_log(tmp_path / "items.csv", [("a", "c1"), ("b", "c2"), ("c", "c1")], header=None)
    rerun = preprocess(logs, tmp_path / "out", "--items", items, "--items-columns", "item,category", *KEEP_ALL_ITEMS)
    assert stage_states(rerun.stdout)["events"] == "built"
    assert read_manifest(tmp_path / "out" / "events")["fingerprint"]["params"]["items_columns"] == ["item", "category"]


def test_rewriting_identical_input_keeps_the_cache(tmp_path: Path, logs: Path) -> None:
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    content = logs.read_bytes()
    logs.unlink()
    logs.write_bytes(content)  # new file, new mtime, same content
    assert stage_states(preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS).stdout) == all_states("cached")


@pytest.mark.parametrize(
    ("options", "rebuilt"),
    [
        (("--session-gap", "5m"), {"sessions", "long_term", "splits"}),
        (("--max-session-length", "3"), {"sessions", "long_term", "splits"}),
        (("--max-long", "1"), {"long_term"}),
        (("--long-window", "1d"), {"long_term"}),
        (("--split", "leave-last-out"), {"splits"}),
        (("--max-user-events", "100"), set(STAGES)),
        (("--force",), set(STAGES)),
    ],
)
def test_changed_parameter_reruns_its_stage_and_later_ones(
    tmp_path: Path, logs: Path, options: tuple[str, ...], rebuilt: set[str]
) -> None:
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    states = stage_states(preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS, *options).stdout)
    assert states == {stage: "built" if stage in rebuilt else "cached" for stage in STAGES}


def test_rerun_stage_writes_the_new_output(tmp_path: Path, logs: Path) -> None:
    out = tmp_path / "out"
    preprocess(logs, out, *KEEP_ALL_ITEMS)
    assert inspect_user(out, "u1")["sessions"][1]["long_term"]["item"] == ["b", "a"]
    preprocess(logs, out, *KEEP_ALL_ITEMS, "--max-long", "1")
    assert inspect_user(out, "u1")["sessions"][1]["long_term"]["item"] == ["b"]


@pytest.mark.parametrize("changed", ["logs", "items"])
def test_changed_input_content_reruns_everything(tmp_path: Path, logs: Path, changed: str) -> None:
    items = write_log(tmp_path / "items.csv", [("a", "x"), ("b", "y"), ("c", "z")], header=("item_id", "brand"))
    out = tmp_path / "out"
    preprocess(logs, out, "--items", items, *KEEP_ALL_ITEMS)
    if changed == "logs":
        write_log(logs, [*LOG, ("u2", "a", BASE_MS + 3 * HOUR_MS)])
    else:
        write_log(items, [("a", "x"), ("b", "x"), ("c", "z")], header=("item_id", "brand"))
    states = stage_states(preprocess(logs, out, "--items", items, *KEEP_ALL_ITEMS).stdout)
    assert states == all_states("built")


def test_new_package_version_reruns_everything(tmp_path: Path, logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The package version is one of the fingerprints a manifest records: output written by
    another version is rebuilt. The first run pretends to be version 0.0.0 wherever the
    pipeline asks for its version."""
    with monkeypatch.context() as patch:
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith(("pipeline", "cli")) and hasattr(module, "package_version"):
                patch.setattr(module, "package_version", lambda: "0.0.0")
        preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert '"0.0.0"' in (tmp_path / "out" / "events" / "manifest.json").read_text()
    assert stage_states(preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS).stdout) == all_states("built")


def test_output_is_deterministic(tmp_path: Path, logs: Path) -> None:
    preprocess(logs, tmp_path / "first", *KEEP_ALL_ITEMS)
    preprocess(logs, tmp_path / "second", *KEEP_ALL_ITEMS)
    first = stage_frames(tmp_path / "first")
    assert len(first) >= 8
    assert_same_frames(stage_frames(tmp_path / "second"), first)


# --- interrupted runs -----------------------------------------------------------------------------


def test_stage_failing_midway_keeps_the_previous_complete_stage(tmp_path: Path, logs: Path) -> None:
    out = tmp_path / "out"
    preprocess(logs, out, *KEEP_ALL_ITEMS)
    before = {path: path.read_bytes() for path in (out / "sessions").rglob("*") if path.is_file()}

    def half_written(directory: Path) -> dict:
        (directory / "events.parquet").write_bytes(b"PAR1 half of a file")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        build_stage(out, "sessions", {"new": "fingerprint"}, half_written)
    after = {path: path.read_bytes() for path in (out / "sessions").rglob("*") if path.is_file()}
    assert after == before
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".sessions")) == []


def test_stage_failing_midway_leaves_no_stage_when_there_was_none(tmp_path: Path) -> None:
    def half_written(directory: Path) -> dict:
        (directory / "events.parquet").write_bytes(b"PAR1")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_stage(tmp_path, "events", {}, half_written)
    assert list(tmp_path.iterdir()) == []


def assert_stages_complete_or_absent(out: Path, reference: dict[str, pl.DataFrame]) -> set[str]:
    """Every stage directory present has its manifest and exactly the reference's data."""
    present = set()
    for stage in STAGES:
        if (out / stage).exists():
            assert read_manifest(out / stage) is not None, f"{stage} has no manifest"
            frames = {name: frame for name, frame in stage_frames(out).items() if name.startswith(stage + "/")}
            expected = {name: frame for name, frame in reference.items() if name.startswith(stage + "/")}
            assert frames.keys() == expected.keys(), stage
            assert all(frames[name].equals(expected[name]) for name in expected), stage
            present.add(stage)
    return present


def kill_while_building(command: list[str], out: Path, stage: str) -> int:
    """Start `command`, SIGKILL it as soon as `stage` is being built in `out`; its return code."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if out.is_dir() and any(path.name.startswith(f".{stage}.tmp") for path in out.iterdir()):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    return process.wait()


def test_killed_run_leaves_complete_stages_and_a_rerun_matches(tmp_path: Path) -> None:
    """A real process killed with SIGKILL in the middle of building a stage, first on an empty
    output directory, then while --force rebuilds a complete one."""
    synth = run_sdm("synth", "--events", "300000", "--out", tmp_path / "synth", "--seed", "1")
    assert synth.exit_code == 0, synth.stderr
    logs, items = tmp_path / "synth" / "events.csv", tmp_path / "synth" / "items.csv"
    options = ["--items", str(items)]
    preprocess(logs, tmp_path / "reference", *options)
    reference = stage_frames(tmp_path / "reference")

    out = tmp_path / "out"
    command = ["sdm", "preprocess", str(logs), "--out", str(out), *options]
    assert kill_while_building(command, out, "sessions") == -signal.SIGKILL
    assert assert_stages_complete_or_absent(out, reference) == {"events"}
    states = stage_states(preprocess(logs, out, *options).stdout)
    assert states == {"events": "cached", "sessions": "built", "long_term": "built", "splits": "built"}
    assert_same_frames(stage_frames(out), reference)

    assert kill_while_building([*command, "--force"], out, "long_term") == -signal.SIGKILL
    assert assert_stages_complete_or_absent(out, reference) >= {"events", "sessions"}
    preprocess(logs, out, *options)
    assert_same_frames(stage_frames(out), reference)


# --- bad input ------------------------------------------------------------------------------------


def ragged_log(path: Path, line: int, fields: str) -> Path:
    """100 good rows; the row on file line `line` (1 = header) gets a field too many or too few."""
    rows = [(f"u{k % 3}", f"i{k % 4}", BASE_MS + k * 1_000) for k in range(100)]
    broken = rows[line - 2]
    rows[line - 2] = (*broken, "extra") if fields == "extra" else broken[:2]
    return write_log(path, rows)


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[object], list[str]]]:
    """name -> (arguments after `sdm preprocess`, words the message must contain)."""
    good = write_log(tmp_path / "good.csv", LOG)
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    corrupt_gzip = tmp_path / "corrupt.csv.gz"
    corrupt_gzip.write_bytes(b"user,item,time\nnot gzip at all\n")
    corrupt_parquet = tmp_path / "corrupt.parquet"
    corrupt_parquet.write_bytes(b"PAR1 cut short")
    no_id = write_log(tmp_path / "no_id.csv", [("x", "1")], header=("name", "brand"))
    bad_times = write_log(tmp_path / "bad_times.csv", [
        ("u1", "a", "2023-11-14 22:13:20"), ("u1", "b", "yesterday"), ("u1", "c", "noon"),
        ("u2", "a", "later"), ("u2", "b", "2023-11-14 22:13:21"), ("u2", "c", "soon"),
    ])
    return {
        "missing-file": ([tmp_path / "absent.csv"], ["absent.csv"]),
        "corrupt-gzip": ([corrupt_gzip], ["corrupt.csv.gz"]),
        "corrupt-parquet": ([corrupt_parquet], ["corrupt.parquet"]),
        "empty-file": ([empty], ["empty.csv", "empty"]),
        "header-only": ([write_log(tmp_path / "header.csv", [])], ["header.csv"]),
        "missing-column": (
            [write_log(tmp_path / "no_item.csv", [("u1", "p", BASE_MS)], header=("user", "product_name", "time"))],
            ["item", "user", "product_name", "time"],
        ),
        "bad-timestamps": ([bad_times], ["bad_times.csv", "time"]),
        "extra-field-line-61": ([ragged_log(tmp_path / "ragged.csv", 61, "extra")], ["ragged.csv"]),
        "missing-field-line-61": ([ragged_log(tmp_path / "short.csv", 61, "missing")], ["short.csv"]),
        "extra-field-line-3": ([ragged_log(tmp_path / "early.csv", 3, "extra")], ["early.csv"]),
        "items-without-id": ([good, "--items", no_id], ["no_id.csv", "item"]),
        "users-without-id": ([good, "--users", no_id], ["no_id.csv", "user"]),
        "strict-null-id": ([write_log(tmp_path / "null.csv", [*LOG, ("u1", None, BASE_MS)]), "--strict"], ["null.csv"]),
        "unknown-column-role": ([good, "--column", "colour=brand"], ["colour"]),
        "named-column-absent": ([good, "--column", "item=sku"], ["sku", "user", "item", "time"]),
        "bad-duration": ([good, "--session-gap", "ten minutes"], ["ten minutes"]),
        "overlong-sep": ([good, "--sep", ",,,,,"], ["sep"]),
    }


BAD_INPUTS = [
    "missing-file", "corrupt-gzip", "corrupt-parquet", "empty-file", "header-only", "missing-column",
    "bad-timestamps", "extra-field-line-61", "missing-field-line-61", "extra-field-line-3", "items-without-id",
    "users-without-id", "strict-null-id", "unknown-column-role", "named-column-absent", "bad-duration",
    "overlong-sep",
]


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path: Path, name: str) -> None:
    arguments, words = bad_inputs(tmp_path)[name]
    outcome = run_sdm("preprocess", *arguments, "--out", tmp_path / "out", *KEEP_ALL_ITEMS)
    assert outcome.exit_code == 2, outcome.stdout
    message = outcome.stderr.strip()
    assert "Traceback" not in outcome.stderr and len(message.splitlines()) == 1, outcome.stderr
    for word in words:
        assert word in message, (word, message)
    details = message.replace(str(tmp_path), "")  # digits of the temporary path are no evidence
    if name == "bad-timestamps":  # the count and three examples
        assert re.search(r"\b4\b", details), message
        assert sum(example in details for example in ("yesterday", "noon", "later", "soon")) == 3, message
    if name.startswith(("extra-field", "missing-field")):  # the line number, as a line number
        line = name.rsplit("-", 1)[1]
        assert re.search(rf"line\D{{0,12}}\b{line}\b", details, re.IGNORECASE), message


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_writes_nothing_under_a_new_out_directory(tmp_path: Path, name: str) -> None:
    arguments, _ = bad_inputs(tmp_path)[name]
    out = tmp_path / "new" / "out"
    assert run_sdm("preprocess", *arguments, "--out", out, *KEEP_ALL_ITEMS).exit_code == 2
    assert not out.exists() or sorted(out.rglob("*")) == [], sorted(out.rglob("*"))


def test_output_path_that_is_a_file(tmp_path: Path, logs: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    outcome = run_sdm("preprocess", logs, "--out", taken, *KEEP_ALL_ITEMS)
    assert outcome.exit_code == 2 and "taken" in outcome.stderr and "Traceback" not in outcome.stderr
    assert taken.read_text() == "keep me"


def test_output_path_inside_a_file(tmp_path: Path, logs: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    outcome = run_sdm("preprocess", logs, "--out", taken / "out", *KEEP_ALL_ITEMS)
    assert outcome.exit_code == 2, outcome.stderr[-500:]
    assert "Traceback" not in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1, outcome.stderr[-500:]
    assert taken.read_text() == "keep me"


def test_bad_input_through_the_installed_command(tmp_path: Path) -> None:
    """The console script itself: no traceback reaches the user, exit code 2, one line."""
    logs = write_log(tmp_path / "events.csv", [("u1", "p", BASE_MS)], header=("user", "product_name", "time"))
    result = subprocess.run(["sdm", "preprocess", str(logs), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "item" in result.stderr and "product_name" in result.stderr
    assert result.stdout.strip() == ""


def test_input_files_are_never_modified(tmp_path: Path) -> None:
    # CR-only line endings are the case the reader converts (in memory)
    logs = write_log(tmp_path / "events.csv", LOG, newline="\r")
    items = write_log(tmp_path / "items.csv.gz", [("a", "x"), ("b", "y")], header=("item_id", "brand"))
    users = write_log(tmp_path / "users.csv", [("u1", "30"), ("u2", "40")], header=("user_id", "age"), newline="\r\n")
    inputs = snapshot([logs, items, users])
    time.sleep(0.01)  # a rewrite would show in the modification time
    preprocess(logs, tmp_path / "out", "--items", items, "--users", users, *KEEP_ALL_ITEMS)
    preprocess(logs, tmp_path / "out", "--items", items, "--users", users, "--force", *KEEP_ALL_ITEMS)
    run_sdm("preprocess", logs, "--items", items, "--users", users, "--out", tmp_path / "bad", "--time-format", "%d")
    assert snapshot(inputs) == inputs


# --- sdm info and sdm inspect ---------------------------------------------------------------------


def summary_value(stdout: str, measure: str) -> str:
    """The value column of the summary row whose measure is `measure`."""
    for line in stdout.splitlines():
        cells = [cell.strip() for cell in line.split("│")]  # "", stage, measure, value, ""
        if len(cells) == 5 and cells[2] == measure:
            return cells[3]
    raise AssertionError(f"no summary row {measure!r} in:\n{stdout}")


def test_info_prints_the_summary_again(tmp_path: Path, logs: Path) -> None:
    duplicated = write_log(logs, [*LOG, LOG[0], ("u3", None, BASE_MS)])
    preprocess(duplicated, tmp_path / "out", *KEEP_ALL_ITEMS)
    outcome = invoke("info", tmp_path / "out")
    assert outcome.exit_code == 0
    assert summary_value(outcome.stdout, "rows read") == "8"
    assert summary_value(outcome.stdout, "dropped duplicates") == "1"
    assert summary_value(outcome.stdout, "dropped null ids") == "1"
    assert summary_value(outcome.stdout, "users") == "2"
    assert summary_value(outcome.stdout, "items") == "3"
    assert summary_value(outcome.stdout, "sessions") == "4"  # u1: [a b] [a c], u2: [b] [c]
    assert summary_value(outcome.stdout, "mean session length") == "1.50"
    assert stats(tmp_path / "out", "sessions")["sessions"] == 4


def test_info_on_a_directory_that_is_not_an_output(tmp_path: Path) -> None:
    outcome = run_sdm("info", tmp_path)
    assert outcome.exit_code == 2 and "Traceback" not in outcome.stderr


def test_inspect_json_schema(tmp_path: Path, logs: Path) -> None:
    items = write_log(tmp_path / "items.csv", [("a", "X"), ("b", "Y"), ("c", "Z")], header=("item_id", "brand"))
    logs = write_log(logs, [(user, item, time + 999) for user, item, time in LOG])  # starts are whole seconds + 999 ms
    preprocess(logs, tmp_path / "out", "--items", items, *KEEP_ALL_ITEMS)
    outcome = invoke("inspect", tmp_path / "out", "--user", "u1", "--json")
    assert outcome.exit_code == 0
    assert json.loads(outcome.stdout) == {
        "user": "u1",
        "sessions": [
            {"start": BASE_MS // 1000, "items": ["a", "b"],
             "long_term": {"item": [], "leaf": [], "category": [], "shop": [], "brand": []}},
            {"start": (BASE_MS + HOUR_MS) // 1000, "items": ["a", "c"],
             "long_term": {"item": ["b", "a"], "leaf": [], "category": [], "shop": [], "brand": ["Y", "X"]}},
        ],
    }
    assert all(type(session["start"]) is int for session in json.loads(outcome.stdout)["sessions"])


def test_inspect_without_json_is_readable(tmp_path: Path, logs: Path) -> None:
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    outcome = invoke("inspect", tmp_path / "out", "--user", "u1")
    assert outcome.exit_code == 0
    assert "2023-11-14 22:13:20" in outcome.stdout and "a b" in outcome.stdout


def test_inspect_unknown_user(tmp_path: Path, logs: Path) -> None:
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    outcome = run_sdm("inspect", tmp_path / "out", "--user", "nobody", "--json")
    assert outcome.exit_code == 2 and "nobody" in outcome.stderr and "Traceback" not in outcome.stderr


@pytest.mark.parametrize(("command", "shown"), [
    ("preprocess", ["[default: 10m]", "[default: 50]", "[default: 7d]", "under [preprocess]"]),
    ("train", ["under [train]", "[default: profile+current]"]),
])
def test_help_shows_defaults_and_config_sections(command, shown):
    # Square brackets are rich markup to Typer: unescaped, "[default: 50]" vanished from --help.
    text = re.sub(r"[\s│]+", " ", run_sdm(command, "--help").stdout)
    for phrase in shown:
        assert phrase in text


def test_column_roles_apply_in_the_file_that_has_the_column(tmp_path):
    # movies.csv names its category `title` and users.csv its user id `ref`: each --column applies
    # where its column is, the log keeping its own userId and movieId.
    events = [(u, m, 1_700_000_000 + 60 * (3 * u + m)) for u in (1, 2) for m in (10, 11, 12)]
    log = write_log(tmp_path / "ratings.csv", events, header=("userId", "movieId", "timestamp"))
    items = write_log(tmp_path / "movies.csv", [(10, "Heat", "Crime"), (11, "Up", "Animation"), (12, "Heat", "Drama")],
                      header=("movieId", "title", "genres"))
    users = write_log(tmp_path / "users.csv", [(1, 20), (2, 30)], header=("ref", "age"))
    out = tmp_path / "data"
    preprocess(log, out, *KEEP_ALL_ITEMS, "--items", items, "--users", users, "--column", "category=title", "--column", "user=ref")
    assert stats(out)["side_features"] == ["category"] and stats(out)["profile_fields"] == ["age"]
    categories = pl.read_parquet(out / "events" / "vocab" / "category.parquet").get_column("raw").to_list()
    assert sorted(categories) == ["Heat", "Up"]
    ages = pl.read_parquet(out / "events" / "vocab" / "profile.age.parquet").get_column("raw").to_list()
    assert sorted(ages) == ["20", "30"]
    refused = run_sdm("preprocess", log, "--out", tmp_path / "other", "--items", items, "--column", "category=nope")
    assert refused.exit_code == 2 and "names no column of any input file" in refused.stderr and "movies.csv" in refused.stderr
