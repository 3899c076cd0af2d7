"""Reading raw logs: files, formats and delimiters, as a `Table` of string columns (column roles are
in pipeline/roles.py, timestamps in pipeline/times.py).

Every column is read as a string so that raw ids keep their exact spelling ("007" stays "007");
only the time column is converted, to Int64 milliseconds since the Unix epoch (UTC). Text is UTF-8;
bytes that are not (MovieLens's Latin-1 titles, "Mis\xe9rables") are read as U+FFFD, which
pipeline/events.py refuses in an id (two ids could become one) and accepts elsewhere.
"""

from __future__ import annotations

import glob
import gzip
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import InputError

PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
JSON_SCHEMA_ROWS = 10_000  # lines read to find a JSON log's fields and their types
# "::" is MovieLens 1M's and 10M's (`1::1193::5::978300760`): polars reads one-byte separators
# only, so such a file is read as lines and split (`_split_lines`).
DELIMITERS = (",", "\t", "|", ";", "::")
SNIFF_BYTES = 1 << 16
READ_CHUNK = 1 << 22

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
        tried = " ".join("tab" if delimiter == "\t" else delimiter for delimiter in DELIMITERS)
        raise InputError(f"{path}: cannot detect the delimiter (tried {tried}); pass --sep")
    return best


def checked_separator(sep: str | None) -> str | None:
    """--sep as typed: one character, an escape like \\t, or a few characters such as ::."""
    if sep is None:
        return None
    unescaped = {"\\t": "\t", "tab": "\t", "\\|": "|"}.get(sep, sep)
    if not 1 <= len(unescaped) <= 4 or any(char in unescaped for char in "\"\r\n"):
        raise InputError(f"--sep {sep!r}: expected a character such as , ; | or \\t, or a few such as ::")
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
                infer_schema=False, truncate_ragged_lines=True, encoding="utf8-lossy",
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
    """Open CSV or JSON lines (plain or gzip'd) or Parquet lazily, as string columns; check it has rows.
    `path` may be a file, a directory or a glob; several files must have the same columns."""
    files = input_files(path)
    heads = [b"" if is_parquet(file) else _read_head(file) for file in files]
    if is_parquet(files[0]):
        schemas = [_parquet_names(file) for file in files]
        frame, delimiter = as_text(pl.scan_parquet(files)), None
    elif is_json(files[0], heads[0]):
        frames = [_scan_json(file, head) for file, head in zip(files, heads, strict=True)]
        schemas = [frame.collect_schema().names() for frame in frames]
        frame, delimiter = (pl.concat(frames) if len(set(map(tuple, schemas))) == 1 else frames[0]), None
    else:
        for file, head in zip(files, heads, strict=True):
            if not head.strip():
                raise InputError(f"{file}: the file is empty")
        delimiter = checked_separator(sep) or sniff_delimiter(heads[0], files[0])
        schemas = [_csv_names(file, head, delimiter, header, columns) for file, head in zip(files, heads, strict=True)]
        sources = [_csv_source(file, head) for file, head in zip(files, heads, strict=True)]
        if len(delimiter) > 1:
            frame = pl.concat([_split_lines(source, delimiter, schemas[0], header) for source in sources])
        else:
            frame = pl.scan_csv(
                sources[0] if len(sources) == 1 else sources,
                separator=delimiter,
                has_header=header,
                new_columns=list(columns) if columns else None,
                infer_schema=False,
                encoding="utf8-lossy",
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


def is_json(path: Path, head: bytes) -> bool:
    """JSON lines (Amazon's and Yelp's reviews) or a JSON array of objects, by name or by content."""
    return path.name.lower().removesuffix(".gz").endswith(JSON_SUFFIXES) or head.lstrip()[:1] == b"{"


def _scan_json(path: Path, head: bytes) -> pl.LazyFrame:
    if not head.strip():
        raise InputError(f"{path}: the file is empty")
    try:
        if head.lstrip()[:1] == b"[":  # one array: read whole, as polars has no lazy reader for it
            return as_text(pl.read_json(path).lazy())
        return as_text(pl.scan_ndjson(path, infer_schema_length=JSON_SCHEMA_ROWS))
    except pl.exceptions.PolarsError as error:
        raise InputError(f"{path}: not readable as JSON lines or a JSON array ({_first_line(error)})") from None


def as_text(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Every column as a string, as a CSV is read: a list of scalars joined by '|' (a genres or
    categories list, which pipeline/flags.py splits again), an empty list null, and nested objects
    (Amazon's "style": {...}), which can play no role, left out."""
    columns = []
    for name, dtype in frame.collect_schema().items():
        if not dtype.is_nested():
            columns.append(pl.col(name).cast(pl.String))
        elif isinstance(dtype, pl.List) and not dtype.inner.is_nested():
            joined = pl.col(name).cast(pl.List(pl.String)).list.join("|")
            columns.append(pl.when(pl.col(name).list.len() > 0).then(joined).alias(name))
    return frame.select(columns)


def _parquet_names(path: Path) -> list[str]:
    try:
        return pl.scan_parquet(path).collect_schema().names()
    except Exception as error:  # pyarrow/polars raise many types for a corrupt file
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(error)})") from None


def _csv_names(path: Path, head: bytes, delimiter: str, header: bool, columns: Sequence[str] | None) -> list[str]:
    first_line = re.split(rb"\r\n|\r|\n", head, maxsplit=1)[0].decode("utf-8", "replace")
    first_line_fields = first_line.count(delimiter) + 1
    if columns and len(columns) != first_line_fields:
        raise InputError(f"{path}: --columns names {len(columns)} columns but the first line has {first_line_fields} fields")
    if len(delimiter) > 1:
        names = list(columns) if columns else first_line.split(delimiter) if header else [f"column_{i}" for i in range(1, first_line_fields + 1)]
        # as polars names a repeated header name, so that scan_table refuses it the same way
        return [name if name not in names[:i] else f"{name}{DUPLICATE_SUFFIX}{names[:i].count(name) - 1}" for i, name in enumerate(names)]
    frame = pl.scan_csv(
        _csv_source(path, head), separator=delimiter, has_header=header,
        new_columns=list(columns) if columns else None, infer_schema=False, encoding="utf8-lossy",
    )
    try:
        return frame.collect_schema().names()
    except pl.exceptions.PolarsError as error:
        raise InputError(f"{path}: malformed CSV ({_first_line(error)})") from None


def _split_lines(source: Path | io.BytesIO, delimiter: str, names: Sequence[str], header: bool) -> pl.LazyFrame:
    """A file with a several-character delimiter as string columns: its lines read whole, then
    split (no quoting: MovieLens writes none). Empty fields are null, as polars reads them."""
    lines = pl.scan_csv(source, separator="\x1f", has_header=False, quote_char=None, new_columns=["line"],
                        infer_schema=False, skip_rows=int(header), encoding="utf8-lossy")
    fields = pl.col("line").str.strip_chars_end("\r").str.split(delimiter)

    def field(i: int) -> pl.Expr:
        value = fields.list.get(i, null_on_oob=True)
        return pl.when(value != "").then(value)

    return lines.select(field(i).alias(name) for i, name in enumerate(names) if name.strip())


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
