"""Genres as item features: one-hot flag columns (`--flag-columns`, MovieLens 100K's 19 genre
columns) or one column of "|"-separated values (a `genres` or `tags` column, as later MovieLens
releases write them).

A row's set flags, in column order, become two side features:
    category = the first set flag             "Animation"
    leaf     = all set flags joined by "|"     "Animation|Children's|Comedy"
A row with no flag set has neither (null, the "unknown" id 0). The leaf is the finer feature: two
items share it only when they share every flag.

A flag is set when its value is 1, true or yes (any case, 1.0 too) and unset when it is 0, false,
no or empty; any other value is an error, since it means the columns are not flags.

The flags are read from the items file when `--items` is given, else from the event log. They
replace the flag columns in the scanned table, so that no flag column (MovieLens' "Action") is
mistaken for a role such as behaviour.

A list column ("Adventure|Animation|Children") gives the same two features, found by its name
unless --column category=... or leaf=... is given: category = its first value, leaf = the whole
list. "(no genres listed)" and empty values give neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import polars as pl

from pipeline.errors import InputError
from pipeline.reading import Table
from pipeline.roles import normalise_name

SET_VALUES = ("1", "1.0", "true", "yes")
UNSET_VALUES = ("0", "0.0", "false", "no", "")
# Names of the derived columns in the scanned table, mapped to their roles.
FLAG_ROLES = {"category": "category (from flags)", "leaf": "leaf (from flags)"}
LEAF_SEPARATOR = "|"
# Normalised names (see reading.normalise_name) of a column of LEAF_SEPARATOR-separated values.
LIST_COLUMN_NAMES = ("genres", "tags", "genrelist", "categories", "categorylist")
NO_VALUES = ("", "(no genres listed)", "(none)")


def flag_column_names(spec: str, columns: Sequence[str], path: Path | str) -> list[str]:
    """'unknown..Western' (a range of columns in file order, both ends included), 'Action,Comedy',
    or a comma list of both -> the named columns in file order, each once."""
    position = {name: index for index, name in enumerate(columns)}

    def index_of(name: str) -> int:
        if name not in position:
            raise InputError(f"{path}: --flag-columns names no column {name!r}; columns found: {', '.join(columns)}")
        return position[name]

    chosen: set[int] = set()
    for part in (part.strip() for part in spec.split(",")):
        if not part:
            continue
        first, dots, last = part.partition("..")
        start, stop = (index_of(first.strip()), index_of(last.strip())) if dots else (index_of(part),) * 2
        if start > stop:
            raise InputError(f"{path}: --flag-columns {part!r}: {first.strip()!r} comes after {last.strip()!r} in the file")
        chosen.update(range(start, stop + 1))
    if not chosen:
        raise InputError(f"--flag-columns {spec!r}: names no column; expected e.g. unknown..Western or Action,Comedy")
    return [columns[index] for index in sorted(chosen)]


def flag_value(column: str) -> pl.Expr:
    return pl.col(column).str.strip_chars().str.to_lowercase()


def is_set(column: str) -> pl.Expr:
    return flag_value(column).is_in(SET_VALUES)


def flag_features(flags: Sequence[str]) -> dict[str, pl.Expr]:
    """role -> expression: category = the first set flag's name, leaf = the set flags' names joined
    by "|"; both null when no flag is set."""
    set_names = [pl.when(is_set(flag)).then(pl.lit(flag)) for flag in flags]  # null where unset
    any_set = pl.any_horizontal(is_set(flag) for flag in flags)
    return {
        "category": pl.coalesce(set_names),
        "leaf": pl.when(any_set).then(pl.concat_str(set_names, separator=LEAF_SEPARATOR, ignore_nulls=True)),
    }


def check_flag_values(table: Table, flags: Sequence[str]) -> None:
    """InputError naming the first flag column (in column order) that holds something other than a flag."""
    not_flag = {flag: pl.col(flag).is_not_null() & ~flag_value(flag).is_in(SET_VALUES + UNSET_VALUES) for flag in flags}
    (first_bad,) = table.collect([table.frame.select(pl.col(flag).filter(bad).first() for flag, bad in not_flag.items())])
    bad = {flag: value for flag, value in first_bad.row(0, named=True).items() if value is not None}
    if bad:
        column, value = next(iter(bad.items()))
        raise InputError(f"{table.path}: flag column {column!r} holds {value!r}; --flag-columns expects 0/1 (or true/false) values")


def with_flag_features(table: Table, spec: str | None) -> tuple[Table, dict[str, str]]:
    """The table with its flag columns replaced by category and leaf columns, and role -> column
    name of those, to be used as explicit --column roles. Without a spec: the table, unchanged."""
    if spec is None:
        return table, {}
    flags = flag_column_names(spec, table.columns, table.path)
    check_flag_values(table, flags)
    derived = {FLAG_ROLES[role]: expression for role, expression in flag_features(flags).items()}
    frame = table.frame.with_columns(**derived).drop(flags)
    columns = [name for name in table.columns if name not in flags] + list(derived)
    return replace(table, frame=frame, columns=columns), dict(FLAG_ROLES)


def with_genre_features(table: Table, flag_spec: str | None, explicit: Mapping[str, str]) -> tuple[Table, dict[str, str]]:
    """The --flag-columns features when a spec is given, else those of a list column found by name."""
    if flag_spec is not None:
        return with_flag_features(table, flag_spec)
    return with_list_features(table, explicit)


def list_features(column: str) -> dict[str, pl.Expr]:
    """role -> expression for a list column: category = the first value, leaf = the whole list,
    with spaces around the separator removed; both null for an empty list."""
    values = pl.col(column).cast(pl.String).str.strip_chars()
    listed = pl.when(values.str.to_lowercase().is_in(NO_VALUES).not_()).then(values)
    parts = listed.str.split(LEAF_SEPARATOR).list.eval(pl.element().str.strip_chars())
    return {
        "category": parts.list.first(),
        "leaf": parts.list.join(LEAF_SEPARATOR),
    }


def with_list_features(table: Table, explicit: Mapping[str, str]) -> tuple[Table, dict[str, str]]:
    """Like with_flag_features, for a list column found by name. The table, unchanged, when it has
    none or when --column already names a category or leaf column."""
    if explicit.keys() & set(FLAG_ROLES):
        return table, {}
    column = next((name for name in table.columns if normalise_name(name) in LIST_COLUMN_NAMES), None)
    if column is None:
        return table, {}
    derived = {FLAG_ROLES[role]: expression for role, expression in list_features(column).items()}
    frame = table.frame.with_columns(**derived).drop(column)
    columns = [name for name in table.columns if name != column] + list(derived)
    return replace(table, frame=frame, columns=columns), dict(FLAG_ROLES)
