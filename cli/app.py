"""The `sdm` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import typing
from dataclasses import fields
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.config import (
    BOOLEAN, DURATION, DURATION_OR_NONE, INTEGER, NAMES, NUMBER, ROLE_TABLE, SIZE, TEXT, PreprocessConfig, SettingKind,
    parse_duration, parse_size, read_settings, read_toml,
)
from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir

app = typer.Typer(
    name="sdm",
    help="Sequential Deep Matching: preprocess raw logs, train SDM, evaluate full-catalogue retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()
err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
INTERRUPTED_MESSAGE = "interrupted: finished work is kept; rerun the same command to continue (sdm train: add --resume)"
SAMPLE_DIR = Path(__file__).resolve().parent.parent / "sample_data"
# The sample log spans 28 days; three test and two validation days give about 900 and 650 cases.
DEMO_TEST_DAYS, DEMO_VALID_DAYS = 3.0, 2.0
DEMO_KS = (10, 50)

# `--help` groups the options of preprocess and train in these panels (the rest under "Options").
READING_PANEL, FILTERS_PANEL, SESSIONS_PANEL = "Reading the log", "Filters", "Sessions and long-term sets"
SPLITS_PANEL, SCALE_PANEL = "Splits", "Scale (buckets, engine)"
MODEL_PANEL, OPTIMISATION_PANEL, PROCESSES_PANEL = "Model", "Optimisation", "Processes"
OutOption = Annotated[Path, typer.Option("--out", "-o", help="Output directory (created if missing).")]


def parse_column_map(pairs: list[str], option: str = "--column") -> dict[str, str]:
    from pipeline.roles import ALL_ROLES

    mapping = {}
    for pair in pairs:
        role, separator, name = pair.partition("=")
        role = role.strip().lower()
        if not separator or not name or role not in ALL_ROLES:
            raise InputError(f"{option} {pair!r}: expected ROLE=NAME with ROLE one of {', '.join(ALL_ROLES)}")
        mapping[role] = name.strip()
    return mapping


# A config file holds a command's options in their command-line types (an option declared int
# takes a TOML integer, and so on), except these, whose strings the command parses.
KIND_OF_TYPE = {int: INTEGER, float: NUMBER, str: TEXT, bool: BOOLEAN}
SPECIAL_KINDS = {"session_gap": DURATION, "long_window": DURATION_OR_NONE, "memory_limit": SIZE, "columns": NAMES, "items_columns": NAMES, "users_columns": NAMES,
                 "column": ROLE_TABLE}
# Not settings of a config file: where the input and output are (a config file must not redirect
# them), the config file itself, and what one invocation does (--force, --bucket, --resume, ...).
NOT_SETTINGS = {"logs", "out", "items", "users", "data", "config_file", "force", "bucket", "resume", "quiet", "nproc", "ctx",
                "engine", "address", "workers"}


def option_types(command: Any) -> dict[str, type]:
    """Each option of a command function -> its declared type (Optional[int] -> int)."""
    declared = {}
    for name, hint in typing.get_type_hints(command).items():
        if name == "return":
            continue
        arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        declared[name] = arguments[0] if typing.get_origin(hint) is typing.Union and len(arguments) == 1 else hint
    return declared


def setting_kinds(command: Any, names: set[str] | None = None) -> dict[str, SettingKind]:
    """What a config file may set for a command: its options (those in `names`, if given) but NOT_SETTINGS."""
    return {
        name: SPECIAL_KINDS.get(name) or KIND_OF_TYPE[declared]
        for name, declared in option_types(command).items()
        if name not in NOT_SETTINGS and (names is None or name in names)
    }


def read_config_file(path: Path | None) -> dict[str, Any]:
    """The [preprocess] table of a TOML file (or the whole file, if it has no such table), checked."""
    if path is None:
        return {}
    document = read_toml(path)
    return read_settings(path, document.get("preprocess", document), "preprocess", setting_kinds(preprocess))


@app.command()
def preprocess(
    logs: Annotated[Path, typer.Argument(help="Event log: CSV (any common delimiter) or JSON lines, either gzip'd or not, or Parquet.")],
    out: OutOption,
    items: Annotated[Optional[Path], typer.Option(help="Items file: item id + leaf/category/shop/brand columns.")] = None,
    users: Annotated[Optional[Path], typer.Option(help="Users file: user id + profile columns (all other columns).")] = None,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="TOML file with any of these options under \\[preprocess].")] = None,
    sep: Annotated[Optional[str], typer.Option(help="CSV delimiter of the event log: one character, or a few such as '::' (MovieLens 1M). \\[default: detected]", rich_help_panel=READING_PANEL)] = None,
    header: Annotated[Optional[bool], typer.Option("--header/--no-header", help="Whether the first CSV line is a header. \\[default: header]", rich_help_panel=READING_PANEL)] = None,
    columns: Annotated[Optional[str], typer.Option(help="Column names for a headerless file, comma-separated.", rich_help_panel=READING_PANEL)] = None,
    items_columns: Annotated[Optional[str], typer.Option(help="Column names for a headerless --items file, comma-separated (e.g. MovieLens 1M's movies.dat: item,title,genres).", rich_help_panel=READING_PANEL)] = None,
    users_columns: Annotated[Optional[str], typer.Option(help="Column names for a headerless --users file, comma-separated.", rich_help_panel=READING_PANEL)] = None,
    column: Annotated[Optional[list[str]], typer.Option(help="ROLE=NAME: which column plays a role (user, item, time, session, behavior, leaf, category, shop, brand), in the file that has it: the log, --items (item, side features, e.g. category=genres) or --users (user). Repeatable.", rich_help_panel=READING_PANEL)] = None,
    time_format: Annotated[Optional[str], typer.Option(help="strftime format of the time column, e.g. '%d.%m.%Y %H:%M' or '%m%d'. \\[default: unix s/ms or ISO-like, detected]", rich_help_panel=READING_PANEL)] = None,
    flag_columns: Annotated[Optional[str], typer.Option(help="One-hot flag columns (e.g. genres) as item features: a range FIRST..LAST and/or a comma list, e.g. unknown..Western. category = the first set flag, leaf = all set flags joined by '|'. Read from --items if given, else from the log.", rich_help_panel=READING_PANEL)] = None,
    min_item_count: Annotated[Optional[int], typer.Option(help="Drop items seen fewer times. \\[default: 5]", rich_help_panel=FILTERS_PANEL)] = None,
    max_user_events: Annotated[Optional[int], typer.Option(help="Drop users with more events (spam). \\[default: off]", rich_help_panel=FILTERS_PANEL)] = None,
    keep_duplicates: Annotated[Optional[bool], typer.Option("--keep-duplicates", help="Keep exact duplicate events. \\[default: drop]", rich_help_panel=FILTERS_PANEL)] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict", help="Fail on rows with an empty user, item or time instead of dropping them.", rich_help_panel=FILTERS_PANEL)] = None,
    session_gap: Annotated[Optional[str], typer.Option(help="A gap this long or longer starts a new session (unless the session id is shared). \\[default: 10m]", rich_help_panel=SESSIONS_PANEL)] = None,
    max_session_length: Annotated[Optional[int], typer.Option(help="Items per session at most. \\[default: 50]", rich_help_panel=SESSIONS_PANEL)] = None,
    long_window: Annotated[Optional[str], typer.Option(help="How far back long-term sets reach, or 'none'. \\[default: 7d]", rich_help_panel=SESSIONS_PANEL)] = None,
    max_long: Annotated[Optional[int], typer.Option(help="Values per long-term set at most. \\[default: 20]", rich_help_panel=SESSIONS_PANEL)] = None,
    split: Annotated[Optional[str], typer.Option(help="temporal (last days are test) or leave-last-out. \\[default: temporal]", rich_help_panel=SPLITS_PANEL)] = None,
    test_days: Annotated[Optional[float], typer.Option(help="temporal: days at the end used for test. \\[default: 1]", rich_help_panel=SPLITS_PANEL)] = None,
    valid_days: Annotated[Optional[float], typer.Option(help="temporal: days before the test days used for validation. \\[default: 1]", rich_help_panel=SPLITS_PANEL)] = None,
    input_fraction: Annotated[Optional[float], typer.Option(help="temporal: share of a test session given as input. \\[default: 0.25]", rich_help_panel=SPLITS_PANEL)] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild every stage even if cached.")] = False,
    memory_limit: Annotated[Optional[str], typer.Option(help="Memory to stay within, e.g. 4GB: picks how many user buckets the per-user stages are built in. \\[default: 2GB]", rich_help_panel=SCALE_PANEL)] = None,
    buckets: Annotated[Optional[int], typer.Option(help="Number of user buckets, instead of picking it from --memory-limit (1 = all in memory).", rich_help_panel=SCALE_PANEL)] = None,
    bucket: Annotated[Optional[str], typer.Option(help="K/N: build the global step and user bucket K of N only (a job of a scheduler); a final run with --buckets N publishes them.", rich_help_panel=SCALE_PANEL)] = None,
    engine: Annotated[Optional[str], typer.Option(help="dask: run the global step and every user bucket as tasks of Dask distributed, which places and retries them (pip install \"sdm\\[dask]\"); on a local cluster unless --address.", rich_help_panel=SCALE_PANEL)] = None,
    address: Annotated[Optional[str], typer.Option(help="With --engine: the scheduler of a running cluster, e.g. tcp://10.0.0.5:8786; its workers must see LOGS and --out at the same paths.", rich_help_panel=SCALE_PANEL)] = None,
    workers: Annotated[Optional[int], typer.Option(help="With --engine and no --address: worker processes of the local cluster. \\[default: one per core]", rich_help_panel=SCALE_PANEL)] = None,
) -> None:
    """Turn a raw interaction log into cached Parquet sessions, long-term sets and splits.
    LOGS may be one file, a directory of files or a quoted glob ('logs/*.parquet')."""
    from pipeline.buckets import parse_bucket
    from pipeline.engine import EngineOptions
    from pipeline.run import run_preprocess

    settings = read_config_file(config_file)
    given = {
        "sep": sep, "header": header, "time_format": time_format, "flag_columns": flag_columns, "min_item_count": min_item_count,
        "max_user_events": max_user_events, "keep_duplicates": keep_duplicates, "strict": strict,
        "max_session_length": max_session_length, "max_long": max_long, "split": split,
        "test_days": test_days, "valid_days": valid_days, "input_fraction": input_fraction,
        "session_gap": session_gap, "long_window": long_window,
        "columns": columns, "items_columns": items_columns, "users_columns": users_columns,
        "memory_limit": memory_limit, "buckets": buckets,
    }
    settings |= {name: value for name, value in given.items() if value is not None}

    def source(name: str) -> str:
        """Who gave a setting, for the messages about its value: the option or the config file."""
        flag = "--" + name.replace("_", "-")
        return flag if given.get(name) is not None else f"{config_file}: {flag[2:]}"

    config_pairs = [f"{role}={name}" for role, name in settings.pop("column", {}).items()]
    column_map = {**parse_column_map(config_pairs, f"{config_file}: column"), **parse_column_map(column or [])}
    for names_of in ("columns", "items_columns", "users_columns"):
        if names_of in settings:
            names = settings[names_of].split(",") if isinstance(settings[names_of], str) else settings[names_of]
            settings[names_of] = tuple(name.strip() for name in names)
    if "memory_limit" in settings:
        settings["memory_limit"] = parse_size(settings["memory_limit"], option=source("memory_limit"))
    if "session_gap" in settings:
        settings["session_gap_ms"] = parse_duration(settings.pop("session_gap"), option=source("session_gap"))
    if "long_window" in settings:
        settings["long_window_ms"] = parse_duration(settings.pop("long_window"), option=source("long_window"), allow_none=True)
    config = PreprocessConfig(logs=logs, out=out, items=items, users=users, column_map=column_map, **settings)
    if engine is None and (address is not None or workers is not None):
        raise InputError("--address and --workers say where --engine runs; add --engine dask")

    with console.status("") as status:
        reports = run_preprocess(
            config, force=force, on_stage_start=lambda stage: status.update(f"[bold]{stage}[/]: building"),
            bucket=parse_bucket(bucket) if bucket is not None else None,
            engine=EngineOptions(engine, address, workers) if engine is not None else None,
        )
    for report in reports:
        state = "[dim]cached (inputs and parameters unchanged)[/]" if report.cached else f"built in {report.seconds:.2f}s"
        console.print(f"[bold]{report.name:<10}[/] {state}")
    print_summary({report.name: report.stats for report in reports})


def print_summary(summary: dict[str, dict[str, Any]]) -> None:
    from pipeline.diagnostics import warnings

    table = Table(title="Preprocessing summary", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for stage, stats in summary.items():
        for name, value in stats.items():
            if isinstance(value, float):
                shown = f"{value:,.2f}"
            elif isinstance(value, int):
                shown = f"{value:,}"
            else:
                shown = ", ".join(value) if isinstance(value, list) else str(value)
            table.add_row(stage, name.replace("_", " "), shown)
    console.print(table)
    for line in warnings(summary):
        err_console.print(f"[yellow]warning:[/] {line}", highlight=False, soft_wrap=True)


@app.command()
def info(
    directory: Annotated[Path, typer.Argument(help="A `sdm preprocess` output directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (stage -> measures, plus the warnings) instead of a table.")] = False,
) -> None:
    """Print the summary of a preprocess output again."""
    from pipeline.diagnostics import warnings
    from pipeline.run import load_summary

    summary = load_summary(directory)
    if as_json:
        typer.echo(json.dumps({**summary, "warnings": warnings(summary)}, indent=2))
    else:
        print_summary(summary)


@app.command()
def inspect(
    directory: Annotated[Path, typer.Argument(help="A `sdm preprocess` output directory.")],
    user: Annotated[str, typer.Option(help="Raw user id, as in the input log.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Show one user's sessions and long-term sets, in raw ids."""
    from pipeline.inspect import user_sessions

    result = user_sessions(directory, user)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
        return
    table = Table(title=f"user {result['user']}: {len(result['sessions'])} sessions", header_style="bold")
    for name in ("start (UTC)", "items", "long-term sets"):
        table.add_column(name, overflow="fold")
    from datetime import datetime, timezone

    for session in result["sessions"]:
        started = datetime.fromtimestamp(session["start"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        long_term = "\n".join(f"{name}: {' '.join(values)}" for name, values in session["long_term"].items() if values)
        table.add_row(started, " ".join(session["items"]), long_term or "[dim]none[/]")
    console.print(table)


@app.command()
def synth(
    out: OutOption,
    events: Annotated[int, typer.Option(help="Number of events.")] = 60_000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="csv, csv.gz or parquet.")] = "csv",
) -> None:
    """Generate a realistic synthetic e-commerce log (events, items, users)."""
    from pipeline.synth import SynthConfig, write_synth

    if fmt not in ("csv", "csv.gz", "parquet"):
        raise InputError(f"--format {fmt!r}: expected csv, csv.gz or parquet")
    if events < 1 or seed < 0:
        raise InputError(f"--events {events} --seed {seed}: expected at least 1 event and a seed that is not negative")
    ensure_output_dir(out, create=False)
    with console.status(f"generating {events:,} events"):
        paths = write_synth(SynthConfig(n_events=events, seed=seed), out, fmt)
    for name, path in paths.items():
        console.print(f"{name:<7} {path}")


def main(args: list[str] | None = None, prog_name: str | None = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in args  # anywhere on the line, for any command: show the traceback of a bug
    args = [arg for arg in args if arg != "--debug"]

    def command() -> Any:
        refuse_empty_paths(args)
        # Not standalone: a usage error (an unknown option, a value of the wrong type) reaches
        # `guarded`, to be one line like every other error instead of Typer's framed box.
        try:
            return app(args=args, prog_name=prog_name, standalone_mode=False)
        except USAGE_ERROR as error:
            if type(error).__name__ == "NoArgsIsHelpError":  # `sdm` or `sdm COMMAND` alone: the help, as before
                app(args=[*args, "--help"], prog_name=prog_name, standalone_mode=False)
                sys.exit(error.exit_code)
            command = f" {error.ctx.command_path}" if getattr(error, "ctx", None) is not None else ""
            raise InputError(f"{error.format_message().rstrip('.')}; see `{command.strip() or 'sdm'} --help`") from None

    guarded(command, debug)


def guarded(command: Callable[[], Any], debug: bool = False) -> None:
    """Run `command` as the CLI runs every command: the user's errors as one line with exit code 2,
    Ctrl-C as exit code 130 with a word on what was kept, a bug of ours as one line too."""
    # Idle OpenMP threads sleep instead of spinning: on a machine shared with other work, spinning
    # threads made training several times slower (set OMP_WAIT_POLICY=ACTIVE to override).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Under torchrun every rank checks the same inputs; the prefix says which one is talking.
    who = f"rank {rank_of_this_process()}: " if rank_of_this_process() else ""
    try:
        code = command()
    except InputError as error:
        say(f"{who}{error}")
    except OSError as error:  # a full disk, a read-only or unwritable output: the user's to fix, not a bug
        place = f"{error.filename}: " if error.filename else ""
        say(f"{who}{place}{error.strerror or error}")
    except KeyboardInterrupt:  # Ctrl-C outside a command
        if not who:
            err_console.print(INTERRUPTED_MESSAGE, highlight=False)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as exit_:
        if exit_.code == EXIT_INTERRUPTED and not who and not isinstance(exit_, ReportedByRanks):
            err_console.print(INTERRUPTED_MESSAGE, highlight=False)
        raise
    except Exception as error:  # a bug of ours: one line, and the traceback on request
        if debug:
            raise
        say(f"{who}unexpected {type(error).__name__}: {error}; run with --debug for the traceback")
    else:
        # Typer turns Ctrl-C inside a command into exit code 130, returned when not standalone
        if code == EXIT_INTERRUPTED and not who:
            err_console.print(INTERRUPTED_MESSAGE, highlight=False)
        sys.exit(code if isinstance(code, int) else 0)


def refuse_empty_paths(args: list[str]) -> None:
    """An empty path given to a path option or argument is refused: pathlib reads '' as the
    current directory, so `--out "$UNSET"` would write there and `sdm info ""` read it."""
    commands = typer.main.get_command(app).commands
    if not args or args[0] not in commands:
        return
    function = next(info.callback for info in app.registered_commands if (info.name or info.callback.__name__) == args[0])
    paths = {name for name, declared in option_types(function).items() if Path in (declared, *typing.get_args(declared))}
    params = commands[args[0]].params
    takes_value = {flag: param.name for param in params if not getattr(param, "is_flag", False) for flag in param.opts if flag.startswith("-")}
    path_argument = next((param.name.upper() for param in params if param.name in paths and not param.opts[0].startswith("-")), None)
    pending = None  # the option whose value the next token is
    for token in args[1:]:
        flag, equals, value = token.partition("=")
        if pending is None and token in takes_value:
            pending = token
            continue
        if pending is None and equals and flag in takes_value:
            pending, token = flag, value
        if token == "" and (takes_value[pending] in paths if pending else path_argument):
            raise InputError(f"{pending or path_argument}: an empty path; give a file or directory (. for this one)")
        pending = None


# Click's base class of usage errors, found through Typer, which re-exports click's or its own copy.
USAGE_ERROR = next(base for base in typer.BadParameter.__mro__ if base.__name__ == "ClickException")


def say(message: str) -> None:
    """An error as one line on stderr, exit code 2. The text is printed as it is (a raw id or a TOML
    section such as [train] is no markup), its line breaks (from a library's message) as spaces."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    err_console.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False, soft_wrap=True)
    sys.exit(EXIT_BAD_INPUT)


@app.command("train")
def train_command(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option(help="A `sdm preprocess` output directory.")],
    out: OutOption,
    model: Annotated[str, typer.Option(help="sdm, youtube-dnn, popularity, gru4rec, sasrec or item-cf (item-based CF, nothing to train).")] = "sdm",
    epochs: Annotated[int, typer.Option(help="Epochs at most (early stopping may end sooner).", rich_help_panel=OPTIMISATION_PANEL)] = 20,
    batch_size: Annotated[int, typer.Option(help="Sessions per batch and process; 0 = automatic (about 500 steps per epoch, 16 to 256).", rich_help_panel=OPTIMISATION_PANEL)] = 0,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate (after the warm-up; cosine decay to 0 by the last epoch).", rich_help_panel=OPTIMISATION_PANEL)] = 3e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW's decoupled weight decay.", rich_help_panel=OPTIMISATION_PANEL)] = 0.1,
    warmup: Annotated[float, typer.Option(help="Share of the planned steps with a linear learning-rate warm-up.", rich_help_panel=OPTIMISATION_PANEL)] = 0.05,
    clip_norm: Annotated[float, typer.Option(help="Gradients are scaled down to this total norm at most.", rich_help_panel=OPTIMISATION_PANEL)] = 5.0,
    dim: Annotated[int, typer.Option(help="Hidden size d.", rich_help_panel=MODEL_PANEL)] = 64,
    lstm_layers: Annotated[int, typer.Option(help="Stacked LSTM layers (GRU layers for gru4rec).", rich_help_panel=MODEL_PANEL)] = 2,
    heads: Annotated[int, typer.Option(help="Self-attention heads.", rich_help_panel=MODEL_PANEL)] = 4,
    dropout: Annotated[float, typer.Option(help="Dropout between LSTM layers.", rich_help_panel=MODEL_PANEL)] = 0.2,
    fusion: Annotated[str, typer.Option(help="gated, add, concat or multiply.", rich_help_panel=MODEL_PANEL)] = "gated",
    attention_query: Annotated[str, typer.Option(help="Query of the short-term user attention: profile+current (e_u + the current position; the default) or profile (e_u alone, as in the paper).", rich_help_panel=MODEL_PANEL)] = "profile+current",
    long_term: Annotated[bool, typer.Option("--long-term/--no-long-term", help="Use the long-term sets.", rich_help_panel=MODEL_PANEL)] = True,
    short_term: Annotated[bool, typer.Option("--short-term/--no-short-term", help="Use the short-term session.", rich_help_panel=MODEL_PANEL)] = True,
    side_info: Annotated[bool, typer.Option("--side-info/--no-side-info", help="Embed leaf/category/shop/brand with the item id.", rich_help_panel=MODEL_PANEL)] = True,
    user_id: Annotated[bool, typer.Option("--user-id", help="Add a user id embedding to the profile vector.", rich_help_panel=MODEL_PANEL)] = False,
    tie_output: Annotated[bool, typer.Option("--tie-output/--no-tie-output", help="Score items with their input embedding (id + side information) rather than a separate output matrix V.", rich_help_panel=MODEL_PANEL)] = True,
    loss: Annotated[str, typer.Option(help="auto (exact softmax up to 20,000 items, else sampled), sampled or full.", rich_help_panel=OPTIMISATION_PANEL)] = "auto",
    negatives: Annotated[str, typer.Option(help="Sampled softmax negatives: log-uniform or in-batch.", rich_help_panel=OPTIMISATION_PANEL)] = "log-uniform",
    num_negatives: Annotated[int, typer.Option(help="Log-uniform negatives per batch.", rich_help_panel=OPTIMISATION_PANEL)] = 1000,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without validation improvement.", rich_help_panel=OPTIMISATION_PANEL)] = 5,
    select_metric: Annotated[str, typer.Option(help="Validation metric that picks best.pt.", rich_help_panel=OPTIMISATION_PANEL)] = "recall@50",
    exclude_seen: Annotated[Optional[bool], typer.Option("--exclude-seen/--include-seen", help="Rank without the items each user already had, or with them: in validation, and by default in sdm evaluate, recommend and serve. \\[default: without them when no user returns to an item in the training sessions (ratings, reviews)]", rich_help_panel=OPTIMISATION_PANEL)] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same data, same machine: same result).", rich_help_panel=OPTIMISATION_PANEL)] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads per process; 0 = all cores (with --nproc N: cores / N).", rich_help_panel=PROCESSES_PANEL)] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when PyTorch sees a GPU), cpu or cuda.", rich_help_panel=PROCESSES_PANEL)] = "auto",
    bf16: Annotated[bool, typer.Option("--bf16", help="bfloat16 autocast for forward and loss (for GPUs that have it).", rich_help_panel=PROCESSES_PANEL)] = False,
    nproc: Annotated[int, typer.Option(help="Processes on this machine, trained together with DDP (launches torchrun; each takes --batch-size sessions per step). For several machines run torchrun yourself: see the README.", rich_help_panel=PROCESSES_PANEL)] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="TOML file with any of these options under \\[train] (e.g. the best.toml of `sdm tune`); options given on the command line win.")] = None,
) -> None:
    """Train SDM (or a baseline) on preprocessed data; checkpoints and history go to --out."""
    from sdm.training.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)} - {"ks"}
    values = {name: value for name, value in ctx.params.items() if name in names}
    values |= {"data": str(data), "out": str(out)}
    if config_file is not None:
        section = read_toml(config_file).get("train", {})
        settings = read_settings(config_file, section, "train", setting_kinds(train_command, names))
        # Compared by name: Typer ships its own copy of click, whose ParameterSource is not click's.
        values |= {name: value for name, value in settings.items() if ctx.get_parameter_source(name).name == "DEFAULT"}
    config = TrainConfig(**values)
    if nproc < 1:
        raise InputError("--nproc must be at least 1")
    if nproc > 1 and "RANK" in os.environ:
        raise InputError("--nproc starts torchrun itself; under torchrun, set the processes with its --nproc-per-node")
    if nproc > 1:
        launch_ranks(config, nproc, resume=resume, quiet=quiet)
        return
    run_training(config, resume=resume, quiet=quiet or rank_of_this_process() != 0)


@app.command()
def tune(
    data: Annotated[Path, typer.Option(help="A `sdm preprocess` output directory.")],
    out: Annotated[Path, typer.Option(help="Study directory: study.db (resumable with the same options; one model per directory), trials/, best.toml.")],
    model: Annotated[str, typer.Option(help="The model to tune: sdm, youtube-dnn, gru4rec or sasrec.")] = "sdm",
    trials: Annotated[int, typer.Option(help="Finished trials the study should hold (a rerun adds the missing ones).")] = 12,
    epochs: Annotated[int, typer.Option(help="Epochs at most per trial (the same for every model).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed of the sampler and of every trial's training.")] = 0,
    threads: Annotated[int, typer.Option(help="CPU threads; 0 = all cores.")] = 0,
) -> None:
    """Search lr, weight decay, dropout, batch size and dim on the validation split (Optuna TPE);
    writes OUT/best.toml for `sdm train --config OUT/best.toml`."""
    try:
        import optuna
    except ImportError:
        raise InputError("sdm tune needs Optuna: pip install 'sdm[tune]'") from None
    from sdm.training.train import TrainConfig
    from sdm.training.tune import BEST, SEARCHED, tune as run_tune

    base = TrainConfig(data=str(data), out=str(out), model=model, epochs=epochs, seed=seed, threads=threads)
    metric = base.select_metric

    def report(trial: optuna.trial.FrozenTrial) -> None:
        console.print(f"trial {trial.number}: validation {metric} {trial.value:.4f}  {trial.params}", highlight=False)

    study = run_tune(base, out, trials, on_trial=report)
    table = Table(title=f"sdm tune {model}: validation {metric}, best in bold", header_style="bold")
    for column in ("trial", metric, *SEARCHED, "state"):
        table.add_column(column.replace("_", " "), justify="right")
    best = study.best_trial.number
    for trial in study.trials:
        cells = [f"{trial.value:.4f}" if trial.value is not None else "-"]
        cells += [f"{trial.params[name]:.3g}" if name in trial.params else "-" for name in SEARCHED]
        table.add_row(str(trial.number), *cells, trial.state.name.lower(), style="bold" if trial.number == best else None)
    console.print(table)
    console.print(f"best options in {out / BEST}; next: sdm train --data {data} --out RUN --config {out / BEST}")


def rank_of_this_process() -> int:
    """Set by torchrun for each process it starts; 0 when not launched by torchrun."""
    return int(os.environ.get("RANK", "0"))


def launch_ranks(config, nproc: int, *, resume: bool, quiet: bool) -> None:
    """`sdm train --nproc N`: check everything a rank would refuse first (one message, no
    processes started), build the training tensors once, then run N ranks under torchrun."""
    import dataclasses
    import logging
    import uuid

    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from sdm.data.sessions import load_catalogue, load_training
    from sdm.training.distributed import resolve_device
    from sdm.training.train import prepare_run

    if resolve_device(config.device).type == "cuda" and nproc > torch.cuda.device_count():
        raise InputError(f"--nproc {nproc}: more processes than the {torch.cuda.device_count()} GPU(s) here")
    prepare_run(config, resume, world_size=nproc)
    load_training(Path(config.data), load_catalogue(Path(config.data)))
    threads = config.threads or max(1, (os.cpu_count() or 1) // nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the ranks inherit it (torchrun would otherwise warn and pick 1)
    # What `torchrun --standalone --nproc-per-node N -m sdm train ...` does, in-process, handing each
    # rank the config itself, so that a failed rank ends with its own one-line message instead of
    # the launcher's report. (The launcher's modules set their own log levels, so each is
    # quietened by name.)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0,
    )
    try:
        elastic_launch(launch, entrypoint=train_rank)(dataclasses.replace(config, threads=threads), resume, quiet)
    except ChildFailedError as failure:
        code = failure.get_first_failure()[1].exitcode  # the rank that failed first; torchrun stopped the others
        raise ReportedByRanks(code if code > 0 else 128 - code) from None  # killed by signal N: 128 + N, as a shell says
    except SignalException:  # Ctrl-C reached the ranks too
        raise ReportedByRanks(EXIT_INTERRUPTED) from None


def train_rank(config, resume: bool, quiet: bool) -> None:
    """One rank of `sdm train --nproc N`, in a process the launcher started."""
    signal.signal(signal.SIGINT, interrupt_once)
    guarded(lambda: run_training(config, resume=resume, quiet=quiet or rank_of_this_process() != 0))


def interrupt_once(signum: int, frame: Any) -> None:
    """A rank's Ctrl-C: the launcher forwards the one the terminal already sent to the whole group,
    and that second copy, landing while the rank exits, printed a traceback from an atexit callback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


class ReportedByRanks(SystemExit):
    """Exit with a rank's exit code: the rank has already said what went wrong."""


def run_training(config, *, resume: bool, quiet: bool) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sdm.training.checkpoint import read_run_config
    from sdm.training.train import run_excludes_seen, train

    progress = Progress(
        TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[speed]:,.0f} targets/s"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=quiet, transient=True,
    )
    epoch_counter = {"epoch": 0}

    def start_epoch(total: int):
        epoch_counter["epoch"] += 1
        task = progress.add_task("", total=total, epoch=epoch_counter["epoch"], loss=float("nan"), speed=0.0)
        started = time.perf_counter()

        def advance(done: int, loss: float) -> None:
            progress.advance(task, done)
            elapsed = time.perf_counter() - started
            progress.update(task, loss=loss, speed=progress.tasks[task].completed / max(elapsed, 1e-9))

        return advance

    def report(epoch) -> None:
        epoch_counter["epoch"] = epoch.epoch
        metric = config.select_metric
        shown = f"{metric} {epoch.valid[metric]:.4f}" if metric in epoch.valid else "no validation cases"
        fitted = f"loss {epoch.loss:.4f}  {epoch.targets_per_second:,.0f} targets/s  " if epoch.targets_per_second else "counted, no gradient steps  "
        if not quiet:
            console.print(f"epoch {epoch.epoch:>3}  {fitted}{shown}{'  [green]best[/]' if epoch.improved else ''}")

    with progress:
        history = train(config, resume=resume, on_epoch=report, progress=None if quiet else start_epoch)
    if rank_of_this_process() == 0:
        if quiet:  # otherwise each epoch has been printed as it ended
            print_history(history, config.select_metric)
        if config.exclude_seen is None and run_excludes_seen(read_run_config(Path(config.out))):
            console.print("no user returns to an item in these training sessions: validation ranked without each user's "
                          "seen items, as sdm evaluate, recommend and serve will (--include-seen to rank them)", soft_wrap=True)
        console.print(f"run saved in {config.out} (best.pt = best {config.select_metric}); next: sdm evaluate --run {config.out}", soft_wrap=True)


def print_history(history: list[dict], metric: str) -> None:
    table = Table(title="Training", header_style="bold")
    for name in ("epoch", "loss", "targets/s", f"valid {metric}", "best"):
        table.add_column(name, justify="right")
    for row in history:
        value = row["valid"].get(metric)
        fitted = row["targets_per_second"] > 0  # popularity and item-cf count; they take no gradient steps
        table.add_row(
            str(row["epoch"]), f"{row['loss']:.4f}" if fitted else "-", f"{row['targets_per_second']:,.0f}" if fitted else "-",
            "-" if value is None else f"{value:.4f}", "*" if row["improved"] else "",
        )
    console.print(table)


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise InputError(f"--k {text!r}: expected comma-separated positive integers, e.g. 10,20,50,100") from None
    if not ks or ks[0] < 1:
        raise InputError(f"--k {text!r}: expected comma-separated positive integers, e.g. 10,20,50,100")
    return ks


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="A `sdm train` output directory.")],
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    k: Annotated[str, typer.Option("--k", help="Cut-offs, comma-separated.")] = "10,20,50,100",
    exclude_seen: Annotated[Optional[bool], typer.Option("--exclude-seen/--include-seen", help="Rank without the items each user already had, or with them. \\[default: as the run's validation did]")] = None,
    index: Annotated[str, typer.Option(help="exact, or a faiss index: hnsw, flat or ivf (needs the faiss extra); reports its recall against exact search.")] = "exact",
    as_json: Annotated[bool, typer.Option("--json", help="Print the metrics as JSON.")] = False,
) -> None:
    """Full-catalogue retrieval metrics of a trained run; written to RUN/metrics-<split>.json."""
    from pipeline.storage import write_json_atomic
    from sdm.evaluation.evaluate import evaluate_split
    from sdm.evaluation.metrics import METRICS
    from sdm.training.train import load_trained, run_excludes_seen

    if split not in ("test", "valid"):
        raise InputError(f"--split {split!r}: expected test or valid")
    from sdm.serving.ann import INDEX_KINDS

    if index not in ("exact", *INDEX_KINDS):
        raise InputError(f"--index {index!r}: expected exact or one of {', '.join(INDEX_KINDS)}")
    ks = parse_ks(k)
    model, run_config, catalogue = load_trained(run)
    exclude_seen = run_excludes_seen(run_config, exclude_seen)
    metrics = evaluate_split(model, Path(run_config["train"]["data"]), catalogue, split, ks, exclude_seen, index)
    suffix = ("-exclude-seen" if exclude_seen else "") + ("" if index == "exact" else f"-{index}")
    write_json_atomic(
        run / f"metrics-{split}{suffix}.json", {"split": split, "exclude_seen": exclude_seen, "index": index, "metrics": metrics}
    )
    if as_json:
        typer.echo(json.dumps(metrics))
        return
    table = Table(title=f"{run} on {split} ({metrics['n_cases']:,} cases{', seen items excluded' if exclude_seen else ''})", header_style="bold")
    table.add_column("K", justify="right")
    names = METRICS
    for name in names:
        table.add_column(name, justify="right")
    if index != "exact":
        names += ("index_recall",)
        table.add_column(f"{index} recall vs exact", justify="right")
    for cutoff in ks:
        table.add_row(str(cutoff), *(f"{metrics.get(f'{name}@{cutoff}', float('nan')):.4f}" for name in names))
    console.print(table)


@app.command("recommend")
def recommend_command(
    run: Annotated[Path, typer.Option(help="A `sdm train` output directory.")],
    user: Annotated[str, typer.Option(help="Raw user id, as in the input log.")],
    k: Annotated[int, typer.Option("-k", "--k", help="Number of items: one K (`sdm evaluate --k` takes a list of cut-offs, each a K like this one).")] = 10,
    exclude_seen: Annotated[Optional[bool], typer.Option("--exclude-seen/--include-seen", help="Skip the items the user already had, or not. \\[default: as the run's validation did]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines instead of a table.")] = False,
) -> None:
    """The user's top items after their latest session, with raw ids, scores and side information."""
    from sdm.serving.recommend import recommend
    from sdm.training.train import load_trained, run_excludes_seen

    if k < 1:
        raise InputError("-k must be at least 1")
    model, run_config, catalogue = load_trained(run)
    ranked = recommend(model, Path(run_config["train"]["data"]), catalogue, user, k, run_excludes_seen(run_config, exclude_seen))
    if as_json:
        typer.echo(ranked.write_ndjson())
        return
    print_ranking(ranked, f"top {k} for user {user}")


def print_ranking(ranked, title: str) -> None:
    """A `recommend` frame (rank, item, score, side values) as a rich table."""
    table = Table(title=title, header_style="bold")
    for name in ranked.columns:
        table.add_column(name, justify="right" if name in ("rank", "score") else "left")
    for row in ranked.iter_rows():
        table.add_row(*(f"{value:.4f}" if isinstance(value, float) else str(value) for value in row))
    console.print(table)


@app.command("export")
def export_command(
    run: Annotated[Path, typer.Option(help="A `sdm train` output directory.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Directory for the exported files. \\[default: RUN/export]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="The user tower as onnx (needs the serve extra) or torchscript.")] = "onnx",
    index: Annotated[Optional[str], typer.Option(help="Also write a faiss index of the items: flat, hnsw or ivf (needs faiss).")] = None,
    hnsw_m: Annotated[int, typer.Option("--hnsw-m", help="HNSW graph neighbours per item.")] = 48,
    ef_construction: Annotated[int, typer.Option(help="HNSW candidates kept while building.")] = 200,
    ef_search: Annotated[int, typer.Option(help="HNSW candidates kept while searching (at least K are).")] = 1200,
    nlist: Annotated[int, typer.Option(help="IVF clusters; 0 = sqrt(items).")] = 0,
    nprobe: Annotated[int, typer.Option(help="IVF clusters searched; 0 = nlist / 16.")] = 0,
) -> None:
    """Write item vectors, users' current vectors (Parquet), the user tower, optionally a faiss index, and a manifest."""
    from sdm.serving.ann import IndexParams
    from sdm.serving.export import export_run
    from sdm.training.train import load_trained

    params = IndexParams(M=hnsw_m, efConstruction=ef_construction, efSearch=ef_search, nlist=nlist, nprobe=nprobe)
    model, run_config, catalogue = load_trained(run)
    if run_config["train"]["model"] == "item-cf":
        raise InputError(f"{run}: item-cf has no user tower or fixed-size vectors to export; use sdm recommend or sdm evaluate")
    target = out or run / "export"
    manifest = export_run(model, run, run_config, catalogue, target, fmt, index, params)
    extra = f" and a faiss {index} index" if index else ""
    console.print(
        f"exported {manifest['items']:,} item and {manifest['users']:,} user vectors (d={manifest['dim']}), "
        f"{manifest['tower']['file']}{extra} to {target}"
    )


@app.command("serve")
def serve_command(
    run: Annotated[Path, typer.Option(help="A `sdm train` output directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed at start).")] = 8000,
    index: Annotated[str, typer.Option(help="exact, or a faiss index: flat, hnsw or ivf (from RUN/export if `sdm export --index` wrote it, else built at start).")] = "exact",
    workers: Annotated[int, typer.Option(help="Server processes sharing the port, each with its own copy of the model and index.")] = 1,
) -> None:
    """Answer recommendation requests over HTTP until SIGTERM or Ctrl-C (POST /recommend, /recommend/batch; GET /health, /info)."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(f'sdm serve needs {" and ".join(missing)}: pip install "sdm[serve]"')
    if index != "exact" and importlib.util.find_spec("faiss") is None:
        raise InputError(f'--index {index} needs faiss-cpu: pip install "sdm[serve]"')
    from sdm.serving.server import serve

    serve(run, host, port, index, workers, announce=lambda line: console.print(line, highlight=False, soft_wrap=True))


@app.command("report")
def report_command(
    inputs: Annotated[list[Path], typer.Argument(metavar="RESULTS_OR_RUN", help="Results Parquet files of benchmarks/quality.py and/or `sdm train` run directories.", show_default=False)],
    out: OutOption,
) -> None:
    """Markdown tables (mean ± std over seeds, best in bold) and PNG plots (training curves, HR@K, ablations)."""
    from sdm.evaluation.report import write_report

    written = write_report(inputs, out)
    console.print(f"wrote {out / 'report.md'} and {sum(path.suffix == '.png' for path in written)} plots")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its data and runs.")] = Path("sdm-demo"),
    epochs: Annotated[int, typer.Option(help="Training epochs at most for each model (early stopping may end sooner).")] = 5,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Run the whole job on the shipped sample data: preprocess, train SDM and baselines, evaluate, recommend."""
    from pipeline.run import run_preprocess
    from sdm.training.checkpoint import CONFIG, LAST
    from sdm.evaluation.evaluate import evaluate_split
    from sdm.serving.recommend import recommend
    from sdm.training.train import TrainConfig, load_trained, run_excludes_seen

    ensure_output_dir(out, create=False)
    data = out / "data"
    console.rule(f"1. sdm preprocess sample_data/events.csv --test-days {DEMO_TEST_DAYS:g} --valid-days {DEMO_VALID_DAYS:g}")
    config = PreprocessConfig(
        logs=SAMPLE_DIR / "events.csv", items=SAMPLE_DIR / "items.csv", users=SAMPLE_DIR / "users.csv", out=data,
        test_days=DEMO_TEST_DAYS, valid_days=DEMO_VALID_DAYS,
    )
    print_summary({report.name: report.stats for report in run_preprocess(config)})
    results = {}
    for name in ("popularity", "youtube-dnn", "sdm"):
        console.rule(f"2. sdm train --model {name}")
        run = out / "runs" / f"{name}-seed{seed}"
        train_config = TrainConfig(data=str(data), out=str(run), model=name, epochs=epochs, seed=seed)
        if (run / CONFIG).is_file() and (run / LAST).is_file():
            run_training(train_config, resume=True, quiet=False)
        else:
            run_training(train_config, resume=False, quiet=False)
        model, run_config, catalogue = load_trained(run)
        results[name] = evaluate_split(model, data, catalogue, "test", list(DEMO_KS), run_excludes_seen(run_config))
    console.rule("3. sdm evaluate (test split, full catalogue)")
    table = Table(header_style="bold")
    table.add_column("model")
    shown = [f"{metric}@{k}" for metric in ("hit_rate", "ndcg") for k in DEMO_KS]
    for metric in shown:
        table.add_column(metric, justify="right")
    for name, metrics in results.items():
        table.add_row(name, *(f"{metrics[m]:.4f}" for m in shown))
    console.print(table)
    console.rule("4. sdm recommend")
    model, run_config, catalogue = load_trained(out / "runs" / f"sdm-seed{seed}")
    raw_user = most_active_user(data)
    ranked = recommend(model, data, catalogue, raw_user, 5, run_excludes_seen(run_config))
    print_ranking(ranked, f"top 5 for user {raw_user}")


def most_active_user(data: Path) -> str:
    """Raw id of the user with the most events (dense id 1)."""
    import polars as pl

    from pipeline.contract import DataDir

    return pl.read_parquet(DataDir(data).vocabulary("user")).get_column("raw")[0]
