"""Every option of every `sdm` command fed boundary and wrong-type values (issue 17).

The options are not listed here: they are read from the CLI itself (the Typer app's click command
tree for the flags, the command functions' annotations for the declared types), so a new option
is fuzzed without a change to this file, and an option of a type this file has no values for
fails `test_every_option_has_hostile_values`. Each example runs one command in-process (the
`sdm` entry point, `cli.app.main`, as the console script does) on tiny DATA and RUN directories
built once per session, with one option replaced by a hostile value, and asserts the contract:
exit code 0 or 2 (never 1, never a traceback), at most one line of error on stderr (warnings
aside) and not an "unexpected" one (that is a bug of ours), and the inputs unchanged.

The default run draws a few dozen examples (derandomised, so the same ones every time); `-m slow`
draws hundreds.
"""

from __future__ import annotations

import faulthandler
import hashlib
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli.app
from helpers.cli import run_sdm
from pipeline.synth import SynthConfig, write_synth

FUZZ_LOG = SynthConfig(n_events=400, seed=5)  # a log with every column, which preprocesses in a fraction of a second
DEFAULT_EXAMPLES = 25
SLOW_EXAMPLES = 600
HANG_SECONDS = 120

# Commands that are not run: `serve` answers requests until it is stopped (tests/test_server.py
# starts and stops it), and `demo` trains three models on the sample data (minutes) whatever
# its options say.
NOT_RUN = {"serve", "demo"}

INT_VALUES = ["-1", "0", "1", "2", "-9223372036854775809", "9223372036854775808", str(10**30), "1.5", "nan", "", "abc"]
FLOAT_VALUES = ["-1", "0", "-0.0", "0.5", "1", "nan", "inf", "-inf", "1e300", "1e-300", "", "abc"]
TEXT_VALUES = ["", " ", "abc", "-1", "0", "nan", "\u2603" * 40, "a,b,,c", "../../x", "%Y%m%d", "[red]x[/]", "user=", "=x", "10,0,-5"]
# Options whose large valid values start long jobs (many epochs, trials, events, processes):
# they get the hostile values that must be refused, and small valid ones.
BOUNDED = {
    ("train", "epochs"): ["-1", "0", "1", "1.5", "abc", ""],
    ("train", "nproc"): ["-1", "0", "1", "abc"],
    ("tune", "trials"): ["-1", "0", "1", "abc"],
    ("tune", "epochs"): ["-1", "0", "1", "abc"],
    ("synth", "events"): ["-1", "0", "1", "2", "50", "abc", ""],
}


@dataclass(frozen=True)
class Option:
    command: str
    name: str  # the parameter's name in the command function
    flags: tuple[str, ...]  # ("--out", "-o"); empty for an argument
    off_flags: tuple[str, ...]  # ("--no-header",) of a --header/--no-header switch
    declared: object  # the annotation: int, float, str, bool, Path, list[str], list[Path]
    is_flag: bool


def command_functions() -> dict[str, typing.Callable]:
    return {info.name or info.callback.__name__.replace("_", "-"): info.callback for info in cli.app.app.registered_commands}


def cli_options() -> list[Option]:
    """Every parameter of every command, from the click tree and the functions' annotations."""
    functions = command_functions()
    options = []
    for name, command in typer.main.get_command(cli.app.app).commands.items():
        declared = cli.app.option_types(functions[name])
        for param in command.params:
            is_argument = not param.opts[0].startswith("-")
            options.append(Option(
                name, param.name, () if is_argument else tuple(param.opts), tuple(getattr(param, "secondary_opts", ()) or ()),
                declared[param.name], bool(getattr(param, "is_flag", False)),
            ))
    return options


OPTIONS = cli_options()


@dataclass
class Places:
    """The tiny inputs every example reads, and where it may write."""

    log: Path
    data: Path
    run: Path
    user: str
    missing: Path
    directory: Path
    text_file: Path
    out: Path  # a fresh directory per example


def base_arguments(command: str, places: Places) -> dict[str, list[str]]:
    """A valid, short invocation of each command, as {parameter name: its arguments}."""
    data, run, out = str(places.data), str(places.run), str(places.out / "out")
    small_training = {"dim": ["--dim", "8"], "heads": ["--heads", "2"], "lstm_layers": ["--lstm-layers", "1"], "threads": ["--threads", "1"]}
    return {
        "preprocess": {"logs": [str(places.log)], "out": ["--out", out], "min_item_count": ["--min-item-count", "1"]},
        "info": {"directory": [data]},
        "inspect": {"directory": [data], "user": ["--user", places.user]},
        "synth": {"out": ["--out", out], "events": ["--events", "200"]},
        "train": {"data": ["--data", data], "out": ["--out", out], "epochs": ["--epochs", "0"], "quiet": ["--quiet"], **small_training},
        "tune": {"data": ["--data", data], "out": ["--out", out], "trials": ["--trials", "1"], "epochs": ["--epochs", "1"], "threads": ["--threads", "1"]},
        "evaluate": {"run": ["--run", run], "k": ["--k", "10"]},
        "recommend": {"run": ["--run", run], "user": ["--user", places.user]},
        "export": {"run": ["--run", run], "out": ["--out", out], "fmt": ["--format", "torchscript"]},
        "report": {"inputs": [run], "out": ["--out", out]},
    }[command]


def value_strategy(option: Option, places: Places) -> st.SearchStrategy[list[str]]:
    """The arguments that set `option` to a hostile value (for a switch: one of its flags)."""
    if option.is_flag or option.declared is bool:
        return st.sampled_from([[flag] for flag in option.flags + option.off_flags])
    element = typing.get_args(option.declared)[0] if typing.get_origin(option.declared) is list else option.declared
    if element is Path:
        values = [str(places.missing), str(places.directory), str(places.text_file), ""]
    else:
        values = BOUNDED.get((option.command, option.name)) or {int: INT_VALUES, float: FLOAT_VALUES, str: TEXT_VALUES}[element]
    flag = list(option.flags[:1])
    one = st.sampled_from(values).map(lambda value: [*flag, value])
    if typing.get_origin(option.declared) is list:  # repeatable: once or twice
        return st.lists(one, min_size=1, max_size=2).map(lambda parts: [part for arguments in parts for part in arguments])
    return one


def invocation(option: Option, places: Places) -> st.SearchStrategy[list[str]]:
    """`sdm COMMAND` with its base arguments, `option` replaced by a hostile value."""
    def assemble(value: list[str]) -> list[str]:
        arguments = base_arguments(option.command, places) | {option.name: value}
        return [option.command, *(part for parts in arguments.values() for part in parts)]

    return value_strategy(option, places).map(assemble)


def digests(*roots: Path) -> dict[str, str]:
    """Content hash of every file under the roots, but of what the commands are meant to write
    into RUN (sdm evaluate's metrics-*.json)."""
    files = [path for root in roots for path in ([root] if root.is_file() else sorted(root.rglob("*"))) if path.is_file()]
    return {str(path): hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest() for path in files
            if not path.name.startswith("metrics-") and not path.name.startswith(".")}


@pytest.fixture(scope="module")
def places(tiny_data: Path, tiny_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Places:
    from cli.app import most_active_user

    root = tmp_path_factory.mktemp("fuzz")
    log = write_synth(FUZZ_LOG, root / "raw")["events"]
    shutil.copytree(tiny_data, root / "data")
    shutil.copytree(tiny_runs["sdm"], root / "run")
    run_config = root / "run" / "config.json"
    run_config.write_text(run_config.read_text().replace(str(tiny_data), str(root / "data")))  # this run reads this data
    (root / "directory").mkdir()
    (root / "text.txt").write_text("not what any option expects\n")
    return Places(log, root / "data", root / "run", most_active_user(tiny_data), root / "missing" / "file",
                  root / "directory", root / "text.txt", root / "outs")


FUZZED = [option for option in OPTIONS if option.command not in NOT_RUN]


def assert_the_contract(arguments: list[str], places: Places) -> None:
    before = digests(places.log.parent, places.data, places.run)
    places.out.mkdir()
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        outcome = run_sdm(*arguments)
    finally:
        faulthandler.cancel_dump_traceback_later()
        shutil.rmtree(places.out)
    shown = f"sdm {' '.join(arguments)}\n{outcome.output[-3000:]}"
    assert outcome.exit_code in (0, 2), shown
    assert "Traceback" not in outcome.output, shown
    errors = [line for line in outcome.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(errors) <= 1 and "unexpected" not in outcome.stderr, shown
    assert (outcome.exit_code == 2) == (errors != []), shown
    assert digests(places.log.parent, places.data, places.run) == before, shown


def fuzz(places: Places, data: st.DataObject) -> None:
    option = data.draw(st.sampled_from(FUZZED), label="option")
    assert_the_contract(data.draw(invocation(option, places), label="arguments"), places)


@settings(max_examples=DEFAULT_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_hostile_option_values_keep_the_contract(places: Places, data: st.DataObject) -> None:
    fuzz(places, data)


@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_many_hostile_option_values_keep_the_contract(places: Places, data: st.DataObject) -> None:
    fuzz(places, data)


def test_every_option_has_hostile_values(places: Places) -> None:
    """Each option of every command is found, has a declared type this file has values for, and
    its command a base invocation (a new option or command fails here until it is fuzzable)."""
    commands = {option.command for option in OPTIONS}
    assert commands == set(command_functions()) and {"preprocess", "train", "evaluate", "export"} <= commands
    assert len(FUZZED) > 60, len(FUZZED)
    for option in FUZZED:
        value_strategy(option, places)  # a KeyError for a declared type without values
        base_arguments(option.command, places)
    assert ("train", "dropout") in {(option.command, option.name) for option in FUZZED}
