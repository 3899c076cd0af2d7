"""Reading raw logs: file formats, delimiters, column roles and timestamps.

Every column is read as a string so that raw ids keep their exact spelling ("007" stays "007");
only the time column is converted, to Int64 milliseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

import glob
import gzip
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.contract import SIDE_FEATURES
from pipeline.errors import InputError

PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITERS = (",", "\t", "|", ";")
SNIFF_BYTES = 1 << 16
READ_CHUNK = 1 << 22

# Column roles and the names they are commonly given, compared after lower-casing and
# dropping everything but letters and digits ("User ID" == "user_id" == "userid").
EVENT_ROLES: dict[str, tuple[str, ...]] = {
    "user": ("userid", "user", "uid", "visitorid", "customerid", "memberid", "buyerid"),
    "item": ("itemid", "item", "iid", "productid", "product", "sku", "skuid", "movieid",
             "articleid", "goodsid", "contentid"),
    "time": ("timestamp", "time", "ts", "eventtime", "actiontime", "datetime", "date",
             "timestamps", "createdat", "eventtimestamp", "clicktime"),
    "session": ("sessionid", "session", "usersession", "sid"),
    "behavior": ("behavior", "behaviour", "behaviortype", "eventtype", "actiontype", "action",
                 "event", "type", "btag"),
    "leaf": ("leafcategory", "leafcategoryid", "leafcate", "leafcateid", "leaf", "leafid",
             "categoryid", "subcategory", "subcategoryid"),
    "category": ("category", "cate", "cateid", "catid", "categorylevel1", "firstcategory",
                 "topcategory", "genre"),
    "shop": ("shop", "shopid", "sellerid", "seller", "storeid", "store", "merchantid", "merchant"),
    "brand": ("brand", "brandid", "brandname"),
}
REQUIRED_ROLES = ("user", "item", "time")
OPTIONAL_EVENT_ROLES = ("session", "behavior", *SIDE_FEATURES)
ALL_ROLES = (*REQUIRED_ROLES, *OPTIONAL_EVENT_ROLES)

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
ZONED_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z")
DATE_FORMATS = ("%Y-%m-%d", "%Y/%m/%d", "%Y%m%d")
INTEGER_PATTERN = r"^\s*-?\d+\s*$"
# Unix times above these are milliseconds / microseconds (1e11 s is the year 5138).
MILLISECONDS_FROM = 10**11
MICROSECONDS_FROM = 10**14


def normalise_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _read_head(path: Path) -> bytes:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            return handle.read(SNIFF_BYTES)
    except (OSError, EOFError) as error:
        raise InputError(f"{path}: cannot read the file ({error})") from None


QUOTED = r'"(?:[^"]|"")*"'
DUPLICATE_SUFFIX = "_duplicated_"  # how polars renames a repeated header name


def field_counts(lines: Sequence[str], delimiter: str) -> list[int]:
    """Fields per line, not counting delimiters inside double quotes."""
    return [re.sub(QUOTED, "", line).count(delimiter) + 1 for line in lines]


def sniff_delimiter(head: bytes, path: Path) -> str:
    """The delimiter that splits most of the first lines into the same number (> 1) of fields;
    a stray malformed line does not hide it (the reader reports that line later)."""
    text = head.decode("utf-8", errors="replace")
    unquoted = re.sub(QUOTED, '""', text)  # a quoted field may hold line breaks
    lines = [line for line in re.split(r"\r\n|\r|\n", unquoted)[:50] if line.strip()]
    if len(lines) > 1 and not (text.endswith("\n") or text.endswith("\r")):
        lines = lines[:-1]  # the last line of the sample may be cut in the middle
    best, best_score = None, (0, 0)
    for delimiter in DELIMITERS:
        counts = field_counts(lines, delimiter)
        typical = max(set(counts), key=lambda count: (counts.count(count), count))
        score = (counts.count(typical), typical)
        if typical > 1 and counts.count(typical) * 2 > len(counts) and score > best_score:
            best, best_score = delimiter, score
    if best is None:
        raise InputError(f"{path}: cannot detect the delimiter (tried , tab | ;); pass --sep")
    return best


def checked_separator(sep: str | None) -> str | None:
    """--sep as typed: one character, or an escape like \\t."""
    if sep is None:
        return None
    unescaped = {"\\t": "\t", "tab": "\t", "\\|": "|"}.get(sep, sep)
    if len(unescaped) != 1 or unescaped in "\"\r\n":
        raise InputError(f"--sep {sep!r}: expected a single character such as , ; | or \\t")
    return unescaped


def _csv_source(path: Path, head: bytes) -> Path | io.BytesIO:
    """Polars reads \\n and \\r\\n line endings; files with lone CRs (old Mac style) are
    converted in memory, never on disk. A CR inside a quoted field is data and stays."""
    if re.search(rb"\r(?!\n)", head.rstrip(b"\r")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as handle:
            quoted_or_line_end = rb'("(?:[^"]|"")*")|\r\n?'
            return io.BytesIO(re.sub(quoted_or_line_end, lambda match: match.group(1) or b"\n", handle.read()))
    return path


def is_parquet(path: Path) -> bool:
    return path.name.lower().endswith(PARQUET_SUFFIXES)


def input_files(path: Path) -> list[Path]:
    """The files behind an input path: the file itself, every file of a directory (hidden and
    `_`-prefixed ones, such as Spark's _SUCCESS, skipped) or a glob's matches; sorted, so that
    input row numbers do not depend on the file system's listing order."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(file for file in path.iterdir() if file.is_file() and not file.name.startswith((".", "_")))
        if not files:
            raise InputError(f"{path}: the directory holds no files")
    elif glob.has_magic(str(path)):
        files = sorted(Path(match) for match in glob.glob(str(path), recursive=True) if Path(match).is_file())
        if not files:
            raise InputError(f"{path}: no file matches this pattern")
    else:
        raise InputError(f"{path}: no such file")
    if len({is_parquet(file) for file in files}) > 1:
        raise InputError(f"{path}: mixes Parquet and CSV files; give files of one format")
    return files


@dataclass
class Table:
    """An input (a file, or the files of a directory or glob, read as one table in file-name
    order) scanned lazily: every column a string, nothing read beyond the headers yet."""

    path: Path
    frame: pl.LazyFrame
    columns: list[str]
    delimiter: str | None  # None for Parquet
    files: list[Path]

    def collect(self, queries: list[pl.LazyFrame]) -> list[pl.DataFrame]:
        """Run queries over this file (sharing its scan), turning parse failures into a message
        naming the file and, where it can be found, the malformed line."""
        try:
            return pl.collect_all(queries, engine="streaming")
        except pl.exceptions.PolarsError as error:
            raise InputError(f"{self.path}: malformed input ({self.locate_malformed_line() or _first_line(error)})") from None

    def locate_malformed_line(self) -> str | None:
        """The first line whose number of fields differs from its file's first line (quotes
        ignored), prefixed with the file's name when the input has several."""
        if self.delimiter is None:
            return None
        for file in self.files:
            if (found := self._malformed_line_of(file)) is not None:
                return found if len(self.files) == 1 else f"{file.name}: {found}"
        return None

    def _malformed_line_of(self, file: Path) -> str | None:
        try:
            lines = pl.read_csv(
                file, has_header=False, separator="\x1f", quote_char=None, new_columns=["line"],
                infer_schema=False, truncate_ragged_lines=True,
            )
        except pl.exceptions.PolarsError:
            return None
        fields = pl.col("line").fill_null("").str.replace_all(QUOTED, "").str.count_matches(self.delimiter, literal=True) + 1
        blank = pl.col("line").fill_null("").str.strip_chars() == ""
        counted = lines.with_row_index("number", offset=1).select("number", fields.alias("fields"), blank.alias("blank"))
        expected = counted.get_column("fields")[0]
        bad = counted.filter((pl.col("fields") != expected) & ~pl.col("blank")).head(1)  # a blank line is an empty row
        if bad.height == 0:
            return None
        return f"line {bad.get_column('number')[0]} has {bad.get_column('fields')[0]} fields, expected {expected}"


def scan_table(
    path: Path,
    *,
    sep: str | None = None,
    header: bool = True,
    columns: Sequence[str] | None = None,
) -> Table:
    """Open CSV (plain or gzip'd) or Parquet lazily, as string columns; check it has rows.
    `path` may be a file, a directory or a glob; several files must have the same columns."""
    files = input_files(path)
    if is_parquet(files[0]):
        schemas = [_parquet_names(file) for file in files]
        frame, delimiter = pl.scan_parquet(files).select(pl.all().cast(pl.String)), None
    else:
        heads = [_read_head(file) for file in files]
        for file, head in zip(files, heads, strict=True):
            if not head.strip():
                raise InputError(f"{file}: the file is empty")
        delimiter = checked_separator(sep) or sniff_delimiter(heads[0], files[0])
        schemas = [_csv_names(file, head, delimiter, header, columns) for file, head in zip(files, heads, strict=True)]
        sources = [_csv_source(file, head) for file, head in zip(files, heads, strict=True)]
        frame = pl.scan_csv(
            sources[0] if len(sources) == 1 else sources,
            separator=delimiter,
            has_header=header,
            new_columns=list(columns) if columns else None,
            infer_schema=False,
        )
    names = schemas[0]
    for file, other in zip(files[1:], schemas[1:]):
        if other != names:
            raise InputError(f"{path}: {file.name} has columns {', '.join(other)} but {files[0].name} has {', '.join(names)}")
    repeated = [name.rsplit(DUPLICATE_SUFFIX, 1)[0] for name in names if re.fullmatch(rf".+{DUPLICATE_SUFFIX}\d+", name)]
    if repeated:  # polars renamed the second one; which of the two plays the role would be a guess
        raise InputError(f"{path}: column {repeated[0]!r} appears more than once in the header; rename or drop one")
    named = [name for name in names if name.strip()]
    table = Table(path, frame.select(named), named, delimiter, files)
    if table.collect([table.frame.head(1)])[0].height == 0:
        raise InputError(f"{path}: has a header but no rows")
    return table


def _parquet_names(path: Path) -> list[str]:
    try:
        return pl.scan_parquet(path).collect_schema().names()
    except Exception as error:  # pyarrow/polars raise many types for a corrupt file
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None


def _csv_names(path: Path, head: bytes, delimiter: str, header: bool, columns: Sequence[str] | None) -> list[str]:
    first_line_fields = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0].decode("utf-8", "replace").count(delimiter) + 1
    if columns and len(columns) != first_line_fields:
        raise InputError(f"{path}: --columns names {len(columns)} columns but the first line has {first_line_fields} fields")
    frame = pl.scan_csv(
        _csv_source(path, head), separator=delimiter, has_header=header,
        new_columns=list(columns) if columns else None, infer_schema=False,
    )
    try:
        return frame.collect_schema().names()
    except pl.exceptions.PolarsError as error:
        raise InputError(f"{path}: malformed CSV ({_first_line(error)})") from None


def count_rows(table: Table, header: bool) -> int:
    """Data rows of the input, for sizing: Parquet footers, or CSV line ends counted in 4 MB reads
    (polars would memory-map the whole file, and a mapped file counts in the process's RSS). A
    line break inside a quoted field counts as a row: an overestimate, on the safe side."""
    if table.delimiter is None:
        return table.collect([table.frame.select(pl.len())])[0].item()
    rows = 0
    for file in table.files:
        opener = gzip.open if file.name.endswith(".gz") else open
        newlines, carriage_returns, last = 0, 0, b""
        with opener(file, "rb") as handle:
            while chunk := handle.read(READ_CHUNK):
                newlines, carriage_returns, last = newlines + chunk.count(b"\n"), carriage_returns + chunk.count(b"\r"), chunk
        lines = (newlines or carriage_returns) + (not last.endswith((b"\n", b"\r")))  # old Mac files end lines with \r
        rows += lines - header
    return rows


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def find_column(
    columns: Sequence[str], role: str, explicit: Mapping[str, str], candidates: Sequence[str]
) -> str | None:
    """The column playing `role`: the one the user named, else the first common name present."""
    if role in explicit:
        return explicit[role] if explicit[role] in columns else None
    by_normalised = {normalise_name(name): name for name in columns}
    return next((by_normalised[name] for name in candidates if name in by_normalised), None)


def resolve_roles(table: Table, explicit: Mapping[str, str], roles: Sequence[str]) -> dict[str, str]:
    """Map each role in `roles` to a column of the table; required roles must be found."""
    path, columns = table.path, table.columns
    found: dict[str, str] = {}
    for role in roles:
        column = find_column(columns, role, explicit, EVENT_ROLES[role])
        if column is None and role in explicit:
            raise InputError(
                f"{path}: --column {role}={explicit[role]} names no column; "
                f"columns found: {', '.join(columns)}"
            )
        if column is not None and column not in found.values():
            found[role] = column
    missing = [role for role in REQUIRED_ROLES if role in roles and role not in found]
    if missing:
        hint = "set it with --column ROLE=NAME"
        if not any(normalise_name(c) in EVENT_ROLES["user"] + EVENT_ROLES["item"] for c in columns):
            hint += " (if the file has no header, pass --no-header --columns a,b,c)"
        raise InputError(
            f"{path}: missing required column{'s' if len(missing) > 1 else ''} "
            f"{', '.join(missing)}; columns found: {', '.join(columns)}; {hint}"
        )
    return found


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
    if kind == "integer":
        value = text.cast(pl.Int64, strict=False)
        return (
            pl.when(value.abs() >= MICROSECONDS_FROM).then(value // 1000)
            .when(value.abs() >= MILLISECONDS_FROM).then(value)
            .otherwise(value * 1000)
        )
    naive = text.str.replace(r"\s*(UTC|GMT|Z)$", "")
    return pl.coalesce(
        *(_naive_ms(naive, fmt) for fmt in NAIVE_FORMATS),
        *(_zoned_ms(text, fmt) for fmt in ZONED_FORMATS),
        *(_date_ms(naive, fmt) for fmt in DATE_FORMATS),
    )


def time_kind(table: Table, column: str) -> str:
    """'integer' (unix s/ms/us) when the first non-null values are all integers, else 'datetime'."""
    sample = table.collect([table.frame.select(pl.col(column)).drop_nulls().head(1000)])[0].to_series()
    return "integer" if sample.len() > 0 and bool(sample.str.contains(INTEGER_PATTERN).all()) else "datetime"


def unparsed_time_error(table: Table, column: str, expression: pl.Expr, n_failed: int, time_format: str | None) -> InputError:
    """The error for timestamps that did not parse, with three examples."""
    failed = pl.col(column).is_not_null() & expression.is_null()
    examples = table.collect([table.frame.filter(failed).select(pl.col(column)).unique(maintain_order=True).head(3)])[0]
    shown = ", ".join(repr(value) for value in examples.to_series())
    hint = f"--time-format {time_format!r} does not match them" if time_format else (
        "pass --time-format (strftime codes, e.g. '%d.%m.%Y %H:%M')"
    )
    return InputError(f"{table.path}: column '{column}': {n_failed} timestamps do not parse, e.g. {shown}; {hint}")
