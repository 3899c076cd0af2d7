"""Hostile and odd inputs (issue 8): every file is either parsed correctly (ids kept as the exact
strings, times as hand-computed) or rejected with one line on stderr and exit code 2; never a
traceback, a hang or a silent wrong result.

- tests/regression_inputs/: small files of the interesting cases, each with its expected outcome
  in expected.toml, run through the real command in a child process under a timeout;
- generated cases too big to commit (a 10 MB field, very long lines), the same way;
- a hypothesis fuzz: logs with hostile ids written with random delimiters, quoting, BOMs and
  line endings must parse to exactly their rows (or be rejected); the same bytes with random
  damage must still keep the contract;
- paths taken from files (a users-file header, a manifest, a run's config.json, a TOML config)
  never lead outside the output, data or run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import faulthandler
import io
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.cli import child_env, run_sdm, run_sdm_ok
from helpers.logs import BASE_MS, KEEP_ALL_ITEMS, raw_events

REPO = Path(__file__).resolve().parents[1]
REGRESSION_DIR = Path(__file__).resolve().parent / "regression_inputs"
EXPECTED = tomllib.loads((REGRESSION_DIR / "expected.toml").read_text())
BATCH_TIMEOUT_S = 180
FUZZ_EXAMPLES = 30
DAMAGED_EXAMPLES = 30

# Runs `sdm` once per case in one child process (imports are paid once); one JSON line per case
# as it finishes, so that a hang is pinned to the case after the last line.
DRIVER = r"""
import contextlib, io, json, sys, traceback
from cli.app import main
for case in json.loads(sys.argv[1]):
    stderr = io.StringIO()
    exit_code = 0
    sys.argv = ["sdm", *case["args"]]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        try:
            main()
        except SystemExit as exit_:
            exit_code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        except BaseException:
            traceback.print_exc()
            exit_code = 1
    print(json.dumps({"name": case["name"], "exit_code": exit_code, "stderr": stderr.getvalue()}), flush=True)
"""


def run_batch(cases: dict[str, list[str]]) -> dict[str, dict]:
    """name -> `sdm` arguments; every case run in one child process under a timeout."""
    batch = [{"name": name, "args": [str(arg) for arg in args]} for name, args in cases.items()]
    try:
        result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(batch)], cwd=REPO, env=child_env(),
                                capture_output=True, text=True, timeout=BATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as timeout:
        done = [json.loads(line)["name"] for line in (timeout.stdout or b"").decode().splitlines()]
        pytest.fail(f"hung on {batch[len(done)]['name']} (after {len(done)} cases)")
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = {entry["name"]: entry for entry in map(json.loads, result.stdout.splitlines())}
    assert outcomes.keys() == cases.keys()
    return outcomes


def assert_rejected_in_one_line(outcome: dict, words: list[str] = ()) -> None:
    assert outcome["exit_code"] == 2, outcome
    message = outcome["stderr"].strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for word in words:
        assert word in message, (word, message)


def kept_events(out: Path) -> list[tuple[str, str, int]]:
    return sorted(raw_events(out).iter_rows())


# --- regression files -------------------------------------------------------------------------------


def test_regression_files_have_their_expected_outcome(tmp_path: Path) -> None:
    assert sorted(EXPECTED) == sorted(path.name for path in REGRESSION_DIR.iterdir() if path.suffix == ".csv")
    cases = {}
    for name, expected in EXPECTED.items():
        out = tmp_path / name
        if expected.get("role") == "users":
            cases[name] = ["preprocess", REGRESSION_DIR / "bom.csv", "--users", REGRESSION_DIR / name, "--out", out, *KEEP_ALL_ITEMS]
        else:
            cases[name] = ["preprocess", REGRESSION_DIR / name, "--out", out, *KEEP_ALL_ITEMS]
    for name, outcome in run_batch(cases).items():
        expected = EXPECTED[name]
        if expected["outcome"] == "parsed":
            assert outcome["exit_code"] == 0, (name, outcome["stderr"][-2000:])
            assert kept_events(tmp_path / name) == sorted(tuple(event) for event in expected["events"]), name
        else:
            assert_rejected_in_one_line(outcome, expected["words"])
    escaped = [path for path in tmp_path.parent.rglob("escaped*")]
    assert escaped == [], escaped


def test_huge_fields_and_very_long_lines(tmp_path: Path) -> None:
    header = b"user,item,title,time\n"
    rows = b"u1,a,1700000000000\nu1,b,1700000060000\n"
    files = {
        # a 10 MB quoted field (with delimiters and newlines inside) in a column nobody reads
        "ten_mb_field.csv": header + b'u1,a,"' + b"x,\n" * 3_500_000 + b'",1700000000000\nu1,b,y,1700000060000\n',
        # an item id of 10 MB, kept exactly
        "ten_mb_id.csv": header + b"u1," + b"i" * 10_000_000 + b",t,1700000000000\nu1,b,y,1700000060000\n",
        # one line of 100,000 fields among normal ones
        "line_of_100k_fields.csv": b"user,item,time\n" + rows + b"u1,c,1700000120000" + b",extra" * 99_997 + b"\n" + rows,
        # a last line of 5 MB without a line break, and without its time
        "five_mb_last_line.csv": b"user,item,time\n" + rows + b"u1," + b"x" * 5_000_000,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    outcomes = run_batch({name: ["preprocess", tmp_path / name, "--out", tmp_path / f"out-{name}", *KEEP_ALL_ITEMS] for name in files})
    for name in ("ten_mb_field.csv", "ten_mb_id.csv"):
        assert outcomes[name]["exit_code"] == 0, outcomes[name]
    assert kept_events(tmp_path / "out-ten_mb_field.csv") == [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 60_000)]
    assert kept_events(tmp_path / "out-ten_mb_id.csv") == [("u1", "b", BASE_MS + 60_000), ("u1", "i" * 10_000_000, BASE_MS)]
    assert_rejected_in_one_line(outcomes["line_of_100k_fields.csv"], ["line 4", "100000 fields"])
    assert_rejected_in_one_line(outcomes["five_mb_last_line.csv"], ["line 4", "2 fields"])


# --- fuzz -------------------------------------------------------------------------------------------

HOSTILE_CHARACTERS = ["a", "Z", "0", "7", " ", ",", ";", "|", "\t", '"', "'", "\\", "\n", "\r", "é", "😀", "\x00", "#"]


@st.composite
def hostile_logs(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, str, int]]]:
    """(file bytes, the rows they hold): ids of hostile characters, times as unix seconds or
    milliseconds, written with a random delimiter, quoting, line ending and maybe a BOM."""
    ids = st.text(st.sampled_from(HOSTILE_CHARACTERS), min_size=1, max_size=6).filter(lambda text: text.strip(" \t\r\n"))
    # milliseconds: |t| >= 1e11 is read as milliseconds; written as seconds, |t / 1000| < 1e11 as seconds
    times = st.builds(lambda sign, magnitude: sign * magnitude, st.sampled_from([1, -1]), st.integers(10**11, 4 * 10**12))
    rows = draw(st.lists(st.tuples(ids, ids, times), min_size=1, max_size=8))
    delimiter = draw(st.sampled_from([",", ";", "|", "\t"]))
    line_end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    if any(character in field for user, item, _ in rows for field in (user, item) for character in "\r\n"):
        quoting = csv.QUOTE_ALL  # the csv module quotes only the line ending it writes, not the other one
    in_seconds = draw(st.booleans())
    text = io.StringIO()
    writer = csv.writer(text, delimiter=delimiter, lineterminator=line_end, quoting=quoting)
    writer.writerow(["user", "item", "time"])
    written = [(user, item, time // 1000 if in_seconds else time) for user, item, time in rows]
    writer.writerows(written)
    data = ("\ufeff" if draw(st.booleans()) else "") + text.getvalue()
    expected = sorted({(user, item, time * 1000 if in_seconds else time) for user, item, time in written})  # repeats are dropped
    return data.encode(), expected


def run_in_process(data: bytes, directory: Path) -> tuple[dict, Path]:
    """`sdm preprocess` on the bytes, in this process; a hang dumps every stack and exits."""
    logs, out = directory / "events.csv", directory / "out"
    logs.write_bytes(data)
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        outcome = run_sdm("preprocess", logs, "--out", out, *KEEP_ALL_ITEMS)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return {"exit_code": outcome.exit_code, "stderr": outcome.stderr}, out


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(log=hostile_logs())
def test_fuzzed_logs_parse_to_exactly_their_rows_or_are_rejected(log: tuple[bytes, list[tuple[str, str, int]]], tmp_path_factory) -> None:
    data, expected = log
    directory = tmp_path_factory.mktemp("fuzz")
    outcome, out = run_in_process(data, directory)
    if outcome["exit_code"] == 0:
        assert kept_events(out) == expected, data
    else:
        assert_rejected_in_one_line(outcome)
    shutil.rmtree(directory)


@settings(max_examples=DAMAGED_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(log=hostile_logs(), damage=st.lists(st.tuples(st.integers(0, 10**6), st.binary(max_size=3), st.integers(0, 3)), min_size=1, max_size=4))
def test_damaged_logs_keep_the_contract(log: tuple[bytes, list], damage: list[tuple[int, bytes, int]], tmp_path_factory) -> None:
    """Random bytes inserted or cut: the outcome cannot be predicted, but it is a clean exit or a
    one-line rejection."""
    data = bytearray(log[0])
    for position, inserted, removed in damage:
        at = position % (len(data) + 1)
        data[at : at + removed] = inserted
    directory = tmp_path_factory.mktemp("damaged")
    outcome, out = run_in_process(bytes(data), directory)
    if outcome["exit_code"] != 0:
        assert_rejected_in_one_line(outcome)
    else:
        assert kept_events(out)  # something was parsed, and reads back
    shutil.rmtree(directory)


# --- paths from files ---------------------------------------------------------------------------------


def test_manifest_names_never_lead_outside_the_data_directory(tiny_data: Path, tmp_path: Path) -> None:
    """A data directory whose events manifest lists a profile field '../../../../../planted': with a
    valid vocabulary planted where that leads, the run must be refused, not read it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    manifest = json.loads((data / "events" / "manifest.json").read_text())
    assert manifest["stats"]["profile_fields"], "the tiny data has profile fields"
    field = "../../../../../planted"
    manifest["stats"]["profile_fields"][0] = field
    (data / "events" / "manifest.json").write_text(json.dumps(manifest))
    (data / "events" / "vocab" / "profile...").mkdir()
    planted = (data / "events" / "vocab" / f"profile.{field}.parquet").resolve()
    assert not planted.is_relative_to(data.resolve())
    pl.DataFrame({"id": [1], "raw": ["x"], "count": [1]}).write_parquet(planted)

    outcome = run_sdm("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--dim", "8", "--heads", "2", "--quiet")
    assert_rejected_in_one_line({"exit_code": outcome.exit_code, "stderr": outcome.stderr}, [str(data)])
    assert not (tmp_path / "run" / "last.pt").exists()


def test_a_run_pointing_at_another_directory_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    """config.json names its data directory; a crafted one pointing at a directory that is no
    preprocess output (here the file system root) is refused with one line, nothing written."""
    run = tmp_path / "run"
    trained = run_sdm("train", "--data", tiny_data, "--out", run, "--epochs", "1", "--dim", "8", "--heads", "2",
                       "--lstm-layers", "1", "--threads", "2", "--quiet")
    assert trained.exit_code == 0, trained.output
    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = "/"
    (run / "config.json").write_text(json.dumps(config))
    before = sorted(path.name for path in run.iterdir())
    for command in (["evaluate", "--run", run], ["recommend", "--run", run, "--user", "u1"], ["export", "--run", run]):
        outcome = run_sdm(*command)
        assert_rejected_in_one_line({"exit_code": outcome.exit_code, "stderr": outcome.stderr}, ["/"])
    assert sorted(path.name for path in run.iterdir()) == before


def test_a_config_file_cannot_redirect_input_or_output(tmp_path: Path) -> None:
    """--config is parsed as TOML data; paths are not settings it may carry."""
    logs = REGRESSION_DIR / "bom.csv"
    for setting in ('out = "/tmp/elsewhere"', 'logs = "/etc/passwd"', 'users = "../../users.csv"'):
        config = tmp_path / "config.toml"
        config.write_text(f"[preprocess]\n{setting}\n")
        outcome = run_sdm("preprocess", logs, "--out", tmp_path / "out", "--config", config)
        assert_rejected_in_one_line({"exit_code": outcome.exit_code, "stderr": outcome.stderr}, ["unknown setting", setting.split()[0]])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("option", "value", "named"),
    [("--seed", "-1", "--seed"), ("--threads", "-1", "--threads"), ("--heads", "-2", "--heads"), ("--heads", "0", "--heads"),
     ("--dropout", "nan", "--dropout"), ("--dropout", "1.5", "--dropout"), ("--lstm-layers", "0", "--lstm-layers"),
     ("--dim", "0", "--dim"), ("--fusion", "foo", "--fusion"), ("--select-metric", "recall@0", "--select-metric"),
     ("--warmup", "1", "--warmup"), ("--weight-decay", "-0.1", "--weight-decay"), ("--lr", "inf", "--lr"),
     ("--dim", str(2**63), "--dim"), ("--lstm-layers", str(2**63), "--lstm-layers"), ("--threads", str(10**30), "--threads"),
     ("--seed", str(2**64), "--seed"), ("--num-negatives", str(10**30), "--num-negatives")],
)
def test_bad_training_options_are_one_line_before_any_data_is_read(tmp_path, option, value, named):
    """Checked when the options are read: DATA does not even exist here, and nothing is written."""
    outcome = run_sdm("train", "--data", tmp_path / "missing", "--out", tmp_path / "run", option, value)
    assert outcome.exit_code == 2, outcome.output
    assert len(outcome.stderr.strip().splitlines()) == 1 and named in outcome.stderr and "Traceback" not in outcome.output
    assert not (tmp_path / "run").exists()


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, monkeypatch):
    import pipeline.run

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pipeline.run, "run_preprocess", broken)
    log = tmp_path / "log.csv"
    log.write_text("user,item,time\nu,i,1\n")
    outcome = run_sdm("preprocess", log, "--out", tmp_path / "out")
    assert outcome.exit_code == 2 and "Traceback" not in outcome.output
    assert outcome.stderr.strip() == "error: unexpected RuntimeError: a bug; run with --debug for the traceback"
    debugged = run_sdm("preprocess", log, "--out", tmp_path / "out", "--debug")
    assert "Traceback" in debugged.stderr and "a bug" in debugged.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
@pytest.mark.parametrize("table", ["events/items.parquet", "sessions/sessions.parquet", "splits/train.parquet"])
def test_a_damaged_stage_is_named_by_readers_and_rebuilt_by_preprocess(tmp_path, damage, table):
    log = tmp_path / "log.csv"
    log.write_text("user,item,time\n" + "".join(f"u{u},i{(u + e) % 7},{1_700_000_000 + e * 60 + u * 86_400}\n" for u in range(20) for e in range(8)))
    data = tmp_path / "data"
    run_sdm_ok("preprocess", log, "--out", data, "--min-item-count", "1", "--split", "leave-last-out")
    path = data / table
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1))
    else:
        path.unlink()
    stage = table.split("/")[0]
    readers = {"train": ["train", "--data", data, "--out", tmp_path / "run", "--epochs", "1"], "inspect": ["inspect", data, "--user", "u1"]}
    reads = {"events": ("train", "inspect"), "sessions": ("inspect",), "splits": ("train",)}  # the stages each command reads
    for command in (readers[name] for name in reads[stage]):
        outcome = run_sdm(*command)
        assert outcome.exit_code == 2 and "Traceback" not in outcome.output, outcome.output
        assert len(outcome.stderr.strip().splitlines()) == 1 and table in outcome.stderr and "--force" in outcome.stderr
    rebuilt = run_sdm_ok("preprocess", log, "--out", data, "--min-item-count", "1", "--split", "leave-last-out")
    assert f"{stage:<10} built in" in rebuilt.stdout
    assert run_sdm("inspect", data, "--user", "u1").exit_code == 0


def test_a_checkpoint_from_elsewhere_is_refused_on_resume_and_on_load(tiny_data, tmp_path):
    import torch

    run = tmp_path / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "1", "--dim", "16", "--heads", "2", "--quiet")
    shutil.copy(run / "best.pt", run / "last.pt")  # best.pt holds no optimiser state
    outcome = run_sdm("train", "--data", tiny_data, "--out", run, "--epochs", "2", "--dim", "16", "--heads", "2", "--resume")
    assert outcome.exit_code == 2 and "Traceback" not in outcome.output and "optimizer" in outcome.stderr
    torch.save({"weights": torch.zeros(2)}, run / "best.pt")
    outcome = run_sdm("evaluate", "--run", run)
    assert outcome.exit_code == 2 and "best.pt" in outcome.stderr and "no config, epoch, model" in outcome.stderr


# --- config files ---------------------------------------------------------------------------------

# A value of the wrong type for each kind of setting (what a config file may hold is derived from
# the command's options, so a new option is checked here without a change).
WRONG_VALUE = {"an integer": "1.5", "a finite number": '"0.5"', "a string": "5", "true or false": "1"}
WRONG_SPECIAL = {"session_gap": "1.5", "long_window": "5", "memory_limit": "-1", "columns": "5", "items_columns": "5",
                 "users_columns": "5", "column": '"user=uid"'}


def assert_config_refused(outcome, *words: str) -> None:
    assert_rejected_in_one_line({"exit_code": outcome.exit_code, "stderr": outcome.stderr}, list(words))
    assert "unexpected" not in outcome.stderr, outcome.stderr


@pytest.mark.parametrize(
    ("setting", "expected"),
    [('column = "user=uid"', "expected a table"), ("session-gap = 1.5", "expected a duration string"),
     ("test-days = inf", "expected a finite number"), ("test_days = nan", "expected a finite number"),
     ("min-item-count = [1]", "expected an integer"), ("min-item-count = true", "expected an integer"),
     ("strict = \"yes\"", "expected true or false"), ("max-long = 2.5", "expected an integer")],
)
def test_a_preprocess_config_value_of_the_wrong_type_is_named(tmp_path, setting, expected):
    config = tmp_path / "config.toml"
    config.write_text(f"[preprocess]\n{setting}\n")
    outcome = run_sdm("preprocess", REGRESSION_DIR / "bom.csv", "--out", tmp_path / "out", "--config", config)
    key, value = (part.strip() for part in setting.split("=", 1))
    assert_config_refused(outcome, str(config), f"{key} = {value}", expected)
    assert not (tmp_path / "out").exists()


def test_a_huge_number_of_days_is_refused_not_overflowed(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[preprocess]\ntest-days = 1e300\n")
    outcome = run_sdm("preprocess", REGRESSION_DIR / "bom.csv", "--out", tmp_path / "out", "--config", config)
    assert_config_refused(outcome, "--test-days", "at most")
    assert_config_refused(run_sdm("preprocess", REGRESSION_DIR / "bom.csv", "--out", tmp_path / "out", "--valid-days", "inf"), "--valid-days")


def test_every_config_setting_of_the_wrong_type_is_one_line_naming_it(tmp_path):
    from cli.app import preprocess, setting_kinds, train_command
    from sdm.training.train import TrainConfig

    commands = {
        "preprocess": (setting_kinds(preprocess), ["preprocess", REGRESSION_DIR / "bom.csv", "--out", tmp_path / "out"]),
        "train": (setting_kinds(train_command, {f.name for f in dataclasses.fields(TrainConfig)}),
                  ["train", "--data", tmp_path / "missing", "--out", tmp_path / "out"]),
    }
    config = tmp_path / "config.toml"
    for section, (kinds, command) in commands.items():
        assert len(kinds) > 15, kinds.keys()  # the options were found
        for name, kind in kinds.items():
            key = name.replace("_", "-")
            value = WRONG_SPECIAL.get(name, WRONG_VALUE.get(kind.expected))
            config.write_text(f"[{section}]\n{key} = {value}\n")
            outcome = run_sdm(*command, "--config", config)
            assert_config_refused(outcome, f"{key} = {value}", f"expected {kind.expected}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("section", ["preprocess", "train"])
def test_an_unknown_config_key_is_named_with_the_valid_ones(tmp_path, section):
    config = tmp_path / "config.toml"
    config.write_text(f"[{section}]\nlearning-rate = 0.1\n")
    command = ["preprocess", REGRESSION_DIR / "bom.csv"] if section == "preprocess" else ["train", "--data", tmp_path / "missing"]
    outcome = run_sdm(*command, "--out", tmp_path / "out", "--config", config)
    assert_config_refused(outcome, "unknown setting learning-rate", f"[{section}]", "valid:", "min-item-count" if section == "preprocess" else "weight-decay")
    config.write_text(f"{section} = 5\n")  # not a table
    assert_config_refused(run_sdm(*command, "--out", tmp_path / "out", "--config", config), f"[{section}] must be a table")
    config.write_bytes(b"\xff\xfe[preprocess]\n")
    assert_config_refused(run_sdm(*command, "--out", tmp_path / "out", "--config", config), "not UTF-8")


def test_config_keys_may_be_spelled_as_options(tmp_path):
    """`session-gap` (as on the command line) and `session_gap` are the same setting."""
    config = tmp_path / "config.toml"
    for spelling in ("session-gap", "session_gap"):
        out = tmp_path / spelling
        config.write_text(f'[preprocess]\n{spelling} = "5m"\nmin-item-count = 1\ncolumn = {{ user = "user" }}\n')
        run_sdm_ok("preprocess", REGRESSION_DIR / "bom.csv", "--out", out, "--config", config)
        params = json.loads((out / "sessions" / "manifest.json").read_text())["fingerprint"]["params"]
        assert params["session_gap_ms"] == 5 * 60_000
    config.write_text('[preprocess]\nsession-gap = "5m"\nsession_gap = "6m"\n')
    outcome = run_sdm("preprocess", REGRESSION_DIR / "bom.csv", "--out", tmp_path / "twice", "--config", config)
    assert_config_refused(outcome, "set twice")


@pytest.mark.slow  # an ONNX export takes about 15 s on 2 cores
def test_onnx_export_of_a_run_with_embeddings_as_narrow_as_the_example_session(tiny_data, tmp_path):
    """dim 16 gives 4-wide side embeddings, the width the export's example session once had: the
    exporter fixed the session length at 4 and onnxruntime failed on the first real batch."""
    run = tmp_path / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", "1", "--dim", "16", "--heads", "2", "--lstm-layers", "1", "--quiet")
    run_sdm_ok("export", "--run", run)
    assert json.loads((run / "export" / "manifest.json").read_text())["tower"]["onnx_max_abs_difference"] < 1e-4


# --- the training tensor store ------------------------------------------------------------------


def stored_arrays(store: Path) -> dict[str, np.ndarray]:
    return {path.stem: np.load(path) for path in sorted(store.glob("*.npy"))}


def damage_the_digest_cannot_see(store: Path, name: str, array: np.ndarray) -> None:
    """Replace store/name.npy and record the new file in the manifest, as when the bytes between the
    first and last 4 MB of a large file (which the quick digest skips) are damaged: only the
    checks on the mapped arrays can tell."""
    from pipeline.cache import file_records

    np.save(store / f"{name}.npy", array)
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["files"] = file_records(store)
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def stored_data(tiny_data: Path, tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A copy of the tiny data with its training store built, and the store's arrays."""
    from sdm.data.sessions import load_catalogue, load_training

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("tensors"))
    load_training(data, load_catalogue(data))
    return data, stored_arrays(data / "tensors" / "train")


def last_row_cut(array: np.ndarray) -> np.ndarray:
    return array[:-1]


def beyond_the_vocabulary(array: np.ndarray) -> np.ndarray:
    damaged = array.copy()
    damaged.flat[damaged.size // 2] = 999_998  # "Target 999998 is out of bounds", in the issue
    return damaged


def negative(array: np.ndarray) -> np.ndarray:
    damaged = array.copy()
    damaged.flat[-1] = -3
    return damaged


@pytest.mark.parametrize(
    ("name", "damage"),
    [("targets", beyond_the_vocabulary), ("long_item", beyond_the_vocabulary), ("profile", beyond_the_vocabulary),
     ("user", negative), ("lengths", lambda array: np.zeros_like(array)),  # an empty session
     ("items", lambda array: array.astype(np.int64)), ("items", lambda array: np.asfortranarray(array.astype(np.float32))),
     ("user", last_row_cut), ("items", lambda array: array[:, :-1])],
)
def test_a_damaged_store_is_rebuilt_not_used(stored_data, name, damage):
    from sdm.data.sessions import load_catalogue, load_training

    data, built = stored_data
    store = data / "tensors" / "train"
    damage_the_digest_cannot_see(store, name, damage(built[name]))
    training = load_training(data, load_catalogue(data))
    assert {key: tensor.dtype for key, tensor in training.tensors.items()} == dict.fromkeys(built, torch.int32)
    assert {key: tensor.numpy().tolist() for key, tensor in training.tensors.items()} == {key: array.tolist() for key, array in built.items()}
    assert all(np.array_equal(stored_arrays(store)[key], array) for key, array in built.items())


@pytest.mark.parametrize("damage", ["truncated", "header", "swapped"])
def test_a_store_file_cut_short_or_not_npy_or_from_another_data_is_rebuilt(stored_data, tiny_log, tmp_path, damage):
    """Not even re-recorded in the manifest: caught by the digest, or by the size and header checks."""
    from sdm.data.sessions import load_catalogue, load_training
    from helpers.training import preprocess_tiny

    data, built = stored_data
    path = data / "tensors" / "train" / "items.npy"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "header":
        path.write_bytes(b"\x93NUMPY\x09\x00" + path.read_bytes()[8:])  # a version numpy does not know
    else:
        other = preprocess_tiny(tiny_log, tmp_path / "other", min_item_count=1)
        load_training(other, load_catalogue(other))
        shutil.copy(other / "tensors" / "train" / "items.npy", path)
    training = load_training(data, load_catalogue(data))
    assert training.tensors["items"].numpy().tolist() == built["items"].tolist()


def test_each_kind_of_damage_is_named_by_the_check(stored_data):
    from sdm.data.sessions import load_catalogue
    from sdm.data.tensor_store import DamagedStore, checked_arrays

    data, built = stored_data
    store = data / "tensors" / "train"
    catalogue = load_catalogue(data)
    vocab = {"item": catalogue.n_items, "user": catalogue.n_users, **catalogue.side_vocab, "profile": catalogue.profile_vocab}
    assert checked_arrays(store, vocab).keys() == built.keys()
    for name, array, words in [
        ("targets", beyond_the_vocabulary(built["targets"]), ["targets.npy", "999998", "outside the ids"]),
        ("items", built["items"].astype(np.int64), ["items.npy", "int64", "not the int32"]),
        ("user", built["user"][:-1], ["user.npy", "not the int32"]),
    ]:
        np.save(store / f"{name}.npy", array)
        with pytest.raises(DamagedStore) as raised:
            checked_arrays(store, vocab)
        assert all(word in str(raised.value) for word in words), (words, str(raised.value))
        np.save(store / f"{name}.npy", built[name])
    (store / "lengths.npy").write_bytes((store / "lengths.npy").read_bytes()[:-4])
    with pytest.raises(DamagedStore, match="bytes, but its header"):
        checked_arrays(store, vocab)


def test_a_damaged_store_that_cannot_be_rebuilt_is_one_line(stored_data, tmp_path, monkeypatch):
    import sdm.data.tensor_store

    data, built = stored_data
    damage_the_digest_cannot_see(data / "tensors" / "train", "targets", beyond_the_vocabulary(built["targets"]))

    class ReadOnly:  # what FileLock meets in a DATA the user may read but not write (root writes anyway)
        def __init__(self, path):
            pass

        def acquire(self):
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(sdm.data.tensor_store, "FileLock", ReadOnly)
    outcome = run_sdm("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--dim", "8", "--heads", "2", "--quiet")
    assert_config_refused(outcome, "targets.npy", "outside the ids", "write access")
    assert not (tmp_path / "run").exists()


def test_a_store_still_wrong_after_its_rebuild_is_one_line(stored_data):
    """Ids beyond the vocabulary in the rebuilt store mean the splits disagree with the events
    stage: the fix is to rebuild the data (here the vocabulary is made too small instead)."""
    from pipeline.errors import InputError
    from sdm.data.sessions import load_catalogue
    from sdm.data.tensor_store import ensure_training_tensors

    data, _ = stored_data
    catalogue = load_catalogue(data)
    vocab = {"item": 2, "user": catalogue.n_users, **catalogue.side_vocab, "profile": catalogue.profile_vocab}
    with pytest.raises(InputError, match=r"items.npy: holds values .* as rebuilt from .*splits; rebuild the data with `sdm preprocess .* --force`"):
        ensure_training_tensors(data, catalogue.profile_fields, catalogue.long_features, vocab)


# --- damaged run files ----------------------------------------------------------------------------

RUN_DAMAGES = {
    "truncated": lambda path, other: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "zeroed": lambda path, other: path.write_bytes(bytes(path.stat().st_size)),
    "garbage": lambda path, other: path.write_bytes(bytes(range(256)) * (path.stat().st_size // 256 + 1)),
    "deleted": lambda path, other: path.unlink(),
    "swapped": lambda path, other: shutil.copy(other / path.name, path),  # the file of another run (popularity, other options)
    "json list": lambda path, other: path.write_text("[]"),
    "json without keys": lambda path, other: path.write_text('{"train": {}, "epochs": [{"epoch": "one"}], "metrics": {"hit_rate@10": "high"}}'),
}
# The commands that read each file of a run (evaluate writes metrics-test.json and reads only config.json and best.pt).
READERS = {
    "config.json": ("evaluate", "recommend", "export", "report", "resume"),
    "best.pt": ("evaluate", "recommend", "export", "resume"),
    "last.pt": ("resume",),
    "history.json": ("report",),
    "metrics-test.json": ("report",),
}


def detectable(name: str, damage: str, command: str) -> bool:
    """Whether `command` can tell this damage: JSON of the wrong shape is for JSON files; a run
    without history or metrics is a run (report shows what there is); another run's history,
    metrics or config.json alone are only other valid numbers to `sdm report`; a run without
    last.pt is one killed in its first epoch, which --resume starts again."""
    if damage.startswith("json"):
        return name.endswith(".json")
    if name in ("history.json", "metrics-test.json"):
        return damage not in ("deleted", "swapped")
    if name == "last.pt" and damage == "deleted":
        return False
    return not (name == "config.json" and damage == "swapped" and command == "report")


def run_commands(run: Path, data: Path, out: Path) -> dict[str, list]:
    from cli.app import most_active_user

    return {
        "evaluate": ["evaluate", "--run", run, "--k", "10"],
        "recommend": ["recommend", "--run", run, "--user", most_active_user(data)],
        "export": ["export", "--run", run, "--format", "torchscript", "--out", out],
        "report": ["report", run, "--out", out],
        "resume": ["train", "--data", data, "--out", run, "--epochs", "1", "--dim", "8", "--heads", "2", "--lstm-layers", "1",
                   "--threads", "2", "--resume"],
    }


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_damaged_run_file_is_one_line_for_every_command_that_reads_it(tiny_runs, tiny_data, tmp_path, name):
    """Truncated, zeroed, garbage, deleted, another run's, or JSON of the wrong shape: every reader
    stops with one line naming the file, exit code 2; the run is left as it was and nothing is written."""
    for damage_name, damage in RUN_DAMAGES.items():
        run, out = tmp_path / damage_name / "run", tmp_path / damage_name / "out"
        shutil.copytree(tiny_runs["sdm"], run)
        damage(run / name, tiny_runs["popularity"])
        before = {path.name: path.read_bytes() for path in run.iterdir()}
        for command in (command for command in READERS[name] if detectable(name, damage_name, command)):
            outcome = run_sdm(*run_commands(run, tiny_data, out)[command])
            assert outcome.exit_code == 2, (damage_name, command, outcome.output)
            assert_config_refused(outcome, name if damage_name != "deleted" or name != "config.json" else str(run))
            assert {path.name: path.read_bytes() for path in run.iterdir()} == before, (damage_name, command)
            assert not out.exists(), (damage_name, command)


def test_a_run_file_of_the_right_shape_passes(tiny_runs, tiny_data, tmp_path):
    """The checks refuse damage, not runs: the undamaged run works with every reader (--resume with
    the epochs it has checks everything and trains nothing)."""
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(tiny_runs["sdm"], run)
    for command, arguments in run_commands(run, tiny_data, out).items():
        outcome = run_sdm(*arguments)
        assert outcome.exit_code == 0, (command, outcome.output)
        shutil.rmtree(out, ignore_errors=True)


def test_a_damaged_exported_index_is_built_again_by_serve(tiny_runs, tmp_path):
    """RUN/export/index.faiss is a cache of the item vectors: garbage there is rebuilt at start."""
    pytest.importorskip("faiss")
    pytest.importorskip("fastapi")
    from sdm.serving.server import Service

    run = tmp_path / "run"
    shutil.copytree(tiny_runs["sdm"], run)
    run_sdm_ok("export", "--run", run, "--format", "torchscript", "--index", "flat")
    assert Service(run, "flat").index_source == str(run / "export" / "index.faiss")
    (run / "export" / "index.faiss").write_bytes(b"\x00" * 1000)
    service = Service(run, "flat")
    assert service.index_source == "built at start" and service.index.ntotal == service.n_items


# --- found by tests/test_cli_fuzz.py ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "words"),
    [(["preprocess", REGRESSION_DIR / "bom.csv", "--max-long", str(2**63)], ["--max-long", "at most"]),
     (["preprocess", REGRESSION_DIR / "bom.csv", "--buckets", str(10**30)], ["--buckets", "10,000"]),
     (["preprocess", REGRESSION_DIR / "bom.csv", "--session-gap", "99999999999999999999d"], ["--session-gap", "at most"]),
     (["synth", "--events", "0"], ["--events 0"]), (["synth", "--seed", "-1"], ["--seed -1"]),
     (["train", "--data", "x", "--epochs", "abc"], ["'--epochs'", "integer", "sdm train --help"]),
     (["train", "--data", "x", "--bogus"], ["--bogus", "sdm train --help"]),
     (["nosuch"], ["No such command", "sdm --help"])],
)
def test_found_by_the_fuzz_one_line(tmp_path, arguments, words):
    """Each gave a traceback, an "unexpected" error, a framed box of several lines, or never ended."""
    outcome = run_sdm(*arguments, "--out", tmp_path / "out")
    assert_config_refused(outcome, *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arguments", [["info", ""], ["preprocess", "", "--out", "{out}"], ["preprocess", "{log}", "--out", ""],
                                       ["train", "--data=", "--out", "{out}"], ["report", "", "--out", "{out}"]])
def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch, arguments):
    """`--out ""` (an unset shell variable) once wrote a preprocess output into the current directory."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(REGRESSION_DIR / "bom.csv", tmp_path / "log.csv")
    given = [argument.format(out=tmp_path / "out", log=tmp_path / "log.csv") for argument in arguments]
    assert_config_refused(run_sdm(*given), "an empty path")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["log.csv"]


def test_data_without_training_sessions_is_one_line(tmp_path):
    data = tmp_path / "data"
    run_sdm_ok("preprocess", REGRESSION_DIR / "bom.csv", "--out", data, "--min-item-count", "1")  # 2 events: all held out
    outcome = run_sdm("train", "--data", data, "--out", tmp_path / "run", "--epochs", "1", "--dim", "8", "--heads", "2", "--quiet")
    assert_config_refused(outcome, "no training sessions")


def test_an_error_is_printed_as_it_is(tmp_path):
    """Square brackets are no markup ([train] vanished from messages) and a library's line breaks are spaces."""
    config = tmp_path / "config.toml"
    config.write_text("[train]\n[train.bold]\nx = 1\n")
    outcome = run_sdm("train", "--data", tmp_path, "--out", tmp_path / "run", "--config", config)
    assert_config_refused(outcome, "unknown setting bold in [train]")
