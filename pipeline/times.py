"""Timestamps: a time column of strings as Int64 milliseconds since the Unix epoch (UTC), from unix
seconds, milliseconds or microseconds, ISO-like spellings, or the user's --time-format."""

from __future__ import annotations

import re

import polars as pl

from pipeline.errors import InputError
from pipeline.reading import Table

# Datetime spellings tried in order when no --time-format is given. A trailing "UTC", "GMT"
# or "Z" is removed first; naive times are taken as UTC.
NAIVE_FORMATS = (
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%dT%H:%M",
    "%Y/%m/%d %H:%M:%S",
    "%Y/%m/%d %H:%M",
    "%Y%m%d %H:%M:%S",
)
ZONED_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z",
                 "%a %b %d %H:%M:%S %z %Y")  # Goodreads' and Twitter's "Sun Jul 30 07:44:10 -0700 2017"
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%Y%m%d")
INTEGER_PATTERN = r"^\s*-?\d+\s*$"
# Unix times with a fraction: a column pandas wrote with a missing value is floats ("1472688000.0").
DECIMAL_PATTERN = r"^\s*-?\d+(\.\d+)?\s*$"
# Unix times above these are milliseconds / microseconds (1e11 s is the year 5138).
MILLISECONDS_FROM = 10**11
MICROSECONDS_FROM = 10**14



def _naive_ms(text: pl.Expr, fmt: str) -> pl.Expr:
    return text.str.strptime(pl.Datetime("ms"), fmt, strict=False).dt.epoch("ms")


def _zoned_ms(text: pl.Expr, fmt: str) -> pl.Expr:
    return (
        text.str.strptime(pl.Datetime("ms", "UTC"), fmt, strict=False).dt.epoch("ms")
    )


def _date_ms(text: pl.Expr, fmt: str) -> pl.Expr:
    return text.str.strptime(pl.Date, fmt, strict=False).cast(pl.Datetime("ms")).dt.epoch("ms")


def _pad_compact_numeric(text: pl.Expr, fmt: str) -> tuple[pl.Expr, str]:
    """'%m%d' with values like '829' (Aug 29, leading zero dropped): zero-pad to full width,
    and give year-less formats a leap year so that Feb 29 parses."""
    tokens = re.fullmatch(r"(%[YymdHMS])+", fmt)
    if not tokens:
        return text, fmt
    width = sum(4 if token == "%Y" else 2 for token in re.findall(r"%[YymdHMS]", fmt))
    padded = text.str.zfill(width)
    if "%Y" not in fmt and "%y" not in fmt:
        return pl.lit("2000") + padded, "%Y" + fmt
    return padded, fmt


def time_expression(column: str, time_format: str | None, kind: str) -> pl.Expr:
    """Int64 milliseconds since the epoch for the string column, given the detected kind."""
    text = pl.col(column).str.strip_chars()
    if time_format is not None:
        text, fmt = _pad_compact_numeric(text, time_format)
        if "%z" in fmt or "%Z" in fmt:
            return _zoned_ms(text, fmt)
        if not re.search(r"%[HMST]", fmt):
            return _date_ms(text, fmt)
        return _naive_ms(text, fmt)
    if kind == "integer":  # exact, where a float could round a microsecond time
        value = text.cast(pl.Int64, strict=False)
        return (
            pl.when(value.abs() >= MICROSECONDS_FROM).then(value // 1000)
            .when(value.abs() >= MILLISECONDS_FROM).then(value)
            .otherwise(value * 1000)
        )
    if kind == "decimal":
        value = text.cast(pl.Float64, strict=False)
        return (
            pl.when(value.abs() >= MICROSECONDS_FROM).then(value / 1000)
            .when(value.abs() >= MILLISECONDS_FROM).then(value)
            .otherwise(value * 1000)
        ).round().cast(pl.Int64, strict=False)
    naive = text.str.replace(r"\s*(UTC|GMT|Z)$", "")
    return pl.coalesce(
        *(_naive_ms(naive, fmt) for fmt in NAIVE_FORMATS),
        *(_zoned_ms(text, fmt) for fmt in ZONED_FORMATS),
        *(_date_ms(naive, fmt) for fmt in DATE_FORMATS),
    )


def time_kind(table: Table, column: str) -> str:
    """Unix s/ms/us, 'integer' or 'decimal', when the first non-null values are all numbers, else 'datetime'."""
    sample = table.collect([table.frame.select(pl.col(column)).drop_nulls().head(1000)])[0].to_series()
    if sample.len() == 0 or not sample.str.contains(DECIMAL_PATTERN).all():
        return "datetime"
    return "integer" if sample.str.contains(INTEGER_PATTERN).all() else "decimal"


def unparsed_time_error(table: Table, column: str, expression: pl.Expr, n_failed: int, time_format: str | None) -> InputError:
    """The error for timestamps that did not parse, with three examples."""
    failed = pl.col(column).is_not_null() & expression.is_null()
    examples = table.collect([table.frame.filter(failed).select(pl.col(column)).unique(maintain_order=True).head(3)])[0]
    shown = ", ".join(repr(value) for value in examples.to_series())
    hint = f"--time-format {time_format!r} does not match them" if time_format else (
        "pass --time-format (strftime codes, e.g. '%d.%m.%Y %H:%M')"
    )
    return InputError(f"{table.path}: column '{column}': {n_failed} timestamps do not parse, e.g. {shown}; {hint}")
