"""Stage 1, events: typed and filtered events with dense ids, plus items, users and vocabularies.

Raw values are strings and stay exact ("007" and "7" are different items), but strings are slow
to compare, so all the heavy work (deduplication, counting, filters, joins) runs on their 64-bit
hashes; each column's dictionary (hash -> raw string) is built in the same scan of the file and
checked for collisions, so the result is exact.

Dense ids start at 1 (0 is padding / unknown) and follow descending frequency, ties broken by
the raw value, so that id order is the popularity order a log-uniform negative sampler assumes
and ids do not depend on the order of the input rows.

Beyond memory (pipeline/buckets.py): the one streaming scan of the input that builds the
dictionaries also writes the coded events to a scratch Parquet file per user bucket. Every later
step is a sum of per-bucket aggregates (an exact duplicate and a user's event count never span two
buckets; item and side-value counts are added up over buckets), and the typed events are written
bucket by bucket. With one bucket the coded events simply stay in memory.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.buckets import Layout, bucket_of
from pipeline.config import PreprocessConfig
from pipeline.contract import SIDE_FEATURES
from pipeline.diagnostics import RATING_NAMES
from pipeline.errors import InputError
from pipeline.flags import with_genre_features
from pipeline.reading import Table, scan_table
from pipeline.roles import ALL_ROLES, EVENT_ROLES, find_column, normalise_name, resolve_roles
from pipeline.times import time_expression, time_kind, unparsed_time_error

ID = pl.UInt32
EVENT_SCHEMA = {"user": ID, "item": ID, "time": pl.Int64, "session_key": pl.UInt64, "behavior": ID, "order": pl.UInt32}
CATEGORICAL_ROLES = ("user", "item", "session", "behavior", *SIDE_FEATURES)
IDS = ("user", "item", "time")
HAS_IDS = pl.all_horizontal(pl.col(c).is_not_null() for c in IDS)


@dataclass
class EventTables:
    """Everything of the events stage but the events themselves, which are written bucket by bucket."""

    items: pl.DataFrame  # item, then one id column per side feature present
    users: pl.DataFrame  # user, then one id column per profile field
    vocabularies: dict[str, pl.DataFrame]  # name -> (id, raw, count)
    side_features: list[str]
    profile_fields: list[str]
    stats: dict[str, int]


# How logs write a missing value as text: R's NA, pandas' NaN, SQL's NULL, Python's None.
MISSING_VALUE_MARKERS = ("NA", "N/A", "NaN", "nan", "null", "NULL", "None")


def given(value: pl.Expr) -> pl.Expr:
    """True where a raw value is present: not null, and not one of MISSING_VALUE_MARKERS."""
    return value.is_not_null() & ~value.is_in(MISSING_VALUE_MARKERS)


def code(column: str | pl.Expr) -> pl.Expr:
    """The 64-bit hash standing in for a raw string value; null where the value is missing."""
    value = pl.col(column) if isinstance(column, str) else column
    return pl.when(given(value)).then(value.hash())


def dictionary(frame: pl.LazyFrame, column: str | pl.Expr) -> pl.LazyFrame:
    """(code, raw, collides): every present raw value of a column under its code. Codes are
    computed on the distinct values only, where two of them sharing one is a collision."""
    return (
        frame.select((pl.col(column) if isinstance(column, str) else column).alias("raw"))
        .filter(given(pl.col("raw")))
        .unique()
        .select(code("raw").alias("code"), "raw")
        .with_columns(collides=pl.col("code").is_duplicated())
    )


def checked(dictionary_frame: pl.DataFrame, table: Table, column: str) -> pl.DataFrame:
    if dictionary_frame.get_column("collides").any():
        raise RuntimeError(
            f"{table.path}: two distinct values of column '{column}' share a 64-bit hash; "
            "this is astronomically rare, please report it with the file"
        )
    return dictionary_frame.select("code", "raw")


def read_events(
    config: PreprocessConfig, n_buckets: int, scratch: Path
) -> tuple[list[pl.LazyFrame], dict[str, pl.DataFrame], int, dict[str, Any]]:
    """Events as codes (user, item, time in ms, optional roles, `row` = input order), one frame
    per user bucket (kept in memory for one bucket, else written under `scratch`), each
    categorical role's dictionary, the number of rows read, and facts for the summary: the log's
    rating column (a log with one and no session or behaviour column is a rating log; see
    pipeline/diagnostics.py), its user column, and how many events took their session as user."""
    table = scan_table(config.logs, sep=config.sep, header=config.header, columns=config.columns)
    # Genres (--flag-columns or a list column) are read from the items file when there is one, else from the log.
    table, flag_roles = (table, {}) if config.items else with_genre_features(table, config.flag_columns, config.column_map)
    roles = resolve_roles(table, log_column_map(table, config) | flag_roles, ALL_ROLES)
    time_column = roles["time"]
    time = time_expression(time_column, config.time_format, time_kind(table, time_column))
    categorical: dict[str, str | pl.Expr] = {role: column for role, column in roles.items() if role in CATEGORICAL_ROLES}
    user_column = None if roles.get("session") == roles["user"] else roles["user"]
    # A log with users and sessions: an event without a user is the user of its session (the raw
    # value is built only then, as building it costs a string per event).
    anonymous = "session" in roles and user_column is not None
    if anonymous:
        categorical["user"] = user_or_session(roles["user"], roles["session"])
    # `time_given` (the raw time is not empty) lets the problems be counted on the coded events:
    # a scan of its own would parse every time a second time
    events_query = table.frame.select(
        *(code(value).alias(role) for role, value in categorical.items()),
        time.alias("time"),
        pl.col(time_column).is_not_null().alias("time_given"),
        *([(~given(pl.col(roles["user"]))).alias("user_missing")] if anonymous else []),
    ).with_row_index("row")
    dictionary_queries = [dictionary(table.frame, value) for value in categorical.values()]
    if n_buckets == 1:
        events, *dictionaries = table.collect([events_query, *dictionary_queries])
        parts = [events.lazy()]
    else:
        # One scan per aggregation: run together, their hash tables (one entry per distinct
        # value, several hundred bytes each in the streaming engine) are all alive at once, which
        # at 40M events (2M items) tripled the peak; one after another costs about the same time.
        dictionaries = [table.collect([query])[0] for query in dictionary_queries]
        sink = events_query.with_columns(bucket=bucket_of(pl.col("user"), n_buckets)).sink_parquet(
            pl.PartitionBy(scratch, key="bucket", include_key=False), lazy=True, mkdir=True
        )
        table.collect([sink])
        schema = events_query.collect_schema()
        parts = [
            pl.scan_parquet(folder, hive_partitioning=False) if (folder := scratch / f"bucket={bucket}").is_dir()
            else pl.LazyFrame(schema=schema)  # no user hashed here
            for bucket in range(n_buckets)
        ]
    # events whose user is their session: those with no user beside a session id, or every one
    from_session = pl.col("user_missing") if anonymous else pl.lit(user_column is None)
    unparsed_times, missing_ids, users_from_sessions, rows_read = pl.concat(parts).select(
        (pl.col("time_given") & pl.col("time").is_null()).sum(),
        # a code is null exactly where its raw value is
        (pl.col("user").is_null() | pl.col("item").is_null() | ~pl.col("time_given")).sum(),
        (from_session & pl.col("user").is_not_null()).sum(),
        pl.len(),
    ).collect(engine="streaming").row(0)
    parts = [part.drop("time_given", *(["user_missing"] if anonymous else [])) for part in parts]
    dictionary_of = dict(zip(categorical, dictionaries, strict=True))
    for role in ("user", "item", "session"):
        if role in dictionary_of and (garbled := not_utf8(dictionary_of[role])) is not None:
            raise InputError(f"{table.path}: column {roles[role]!r} holds an id that is not UTF-8 text ({garbled!r}; Latin-1?), "
                             "and replacing its bytes could merge distinct ids; re-encode the file, e.g. iconv -f latin1 -t utf-8")
    if unparsed_times:
        raise unparsed_time_error(table, time_column, time, unparsed_times, config.time_format)
    if missing_ids and (malformed := table.locate_malformed_line()):
        raise InputError(f"{table.path}: malformed input ({malformed})")
    facts = {"rating_column": rating_column(table.columns, roles), "users_from_sessions": users_from_sessions,
             "user_column": user_column}
    return parts, {role: checked(frame, table, roles[role]) for role, frame in dictionary_of.items()}, rows_read, facts


def not_utf8(dictionary_frame: pl.DataFrame) -> str | None:
    """A raw id that held bytes that are not UTF-8, which the reader replaced by U+FFFD
    (pipeline/reading.py): fine in a title, not in an id. Checked on the distinct values only."""
    garbled = dictionary_frame.filter(pl.col("raw").str.contains("\ufffd", literal=True)).head(1)
    return garbled.get_column("raw")[0] if garbled.height else None


def user_or_session(user_column: str, session_column: str) -> pl.Expr:
    """The raw user or, for an event with none (Diginetica's anonymous sessions), the user of its
    own session, "session <id>", apart from the log's users. A log with no user column at all (as
    YOOCHOOSE) takes its session ids as they are (pipeline/roles.py). Such a user has one
    session, so no long-term sets."""
    user = pl.col(user_column)
    return pl.coalesce(pl.when(given(user)).then(user), pl.concat_str(pl.lit("session "), pl.col(session_column)))


def log_column_map(table: Table, config: PreprocessConfig) -> dict[str, str]:
    """The --column mappings for the log. `--column ROLE=NAME` applies where the column is: one that
    names a column of the items file (its item id or a side feature, e.g. category=genres) or of
    the users file (its user id) and not of the log is that file's; one that names no column of
    any file is refused, naming every file's columns."""
    roles_of = {config.items: ("item", *SIDE_FEATURES), config.users: ("user",)}
    columns_of = {table.path: table.columns} | {path: scan_side_file(config, path).columns for path in roles_of if path is not None}
    elsewhere = set()
    for role, column in config.column_map.items():
        if column in table.columns:
            continue
        if not any(column in columns for columns in columns_of.values()):
            found = "; ".join(f"{path}: {', '.join(columns)}" for path, columns in columns_of.items())
            raise InputError(f"--column {role}={column} names no column of any input file; columns found: {found}")
        if any(role in roles and column in columns_of[path] for path, roles in roles_of.items() if path is not None):
            elsewhere.add(role)
    return {role: column for role, column in config.column_map.items() if role not in elsewhere}


def rating_column(columns: list[str], roles: dict[str, str]) -> str | None:
    if "session" in roles or "behavior" in roles:
        return None
    return next((name for name in columns if normalise_name(name) in RATING_NAMES), None)


def scan_side_file(config: PreprocessConfig, path: Path) -> Table:
    """--items or --users (`path`): with its header, or with the names --items-columns or
    --users-columns gives a headerless one."""
    names = config.items_columns if path == config.items else config.users_columns
    return scan_table(path, header=names is None, columns=names)


def read_items_file(config: PreprocessConfig) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Items file as codes: item -> side feature codes, with the side features' dictionaries."""
    table, flag_roles = with_genre_features(scan_side_file(config, config.items), config.flag_columns, config.column_map)
    key = key_column(table, config, "item")
    roles = {
        role: column for role in SIDE_FEATURES
        if (column := find_column(table.columns, role, config.column_map | flag_roles, EVENT_ROLES[role])) not in (None, key)
    }
    items, *dictionaries = table.collect(
        [
            table.frame.select(code(key).alias("item"), *(code(column).alias(role) for role, column in roles.items())),
            *(dictionary(table.frame, column) for column in roles.values()),
        ]
    )
    return items, {role: checked(frame, table, column) for (role, column), frame in zip(roles.items(), dictionaries, strict=True)}


def key_column(table: Table, config: PreprocessConfig, role: str) -> str:
    """The id column of an items or users file: the log's --column name if this file has it too,
    else the usual names."""
    explicit = {role: config.column_map[role]} if config.column_map.get(role) in table.columns else {}
    key = find_column(table.columns, role, explicit, EVENT_ROLES[role])
    if key is None:
        raise InputError(
            f"{table.path}: no {role} id column; columns found: {', '.join(table.columns)}; "
            f"set it with --column {role}=NAME"
        )
    return key


def check_strict(parts: list[pl.LazyFrame], config: PreprocessConfig) -> None:
    """--strict: a row with an empty user, item or time is an error, not a dropped row."""
    missing = pl.concat(parts).filter(pl.any_horizontal(pl.col(c).is_null() for c in IDS))
    count, first_row = missing.select(pl.len(), pl.col("row").min()).collect(engine="streaming").row(0)
    if count:
        raise InputError(
            f"{config.logs}: {count} rows have an empty or missing (NA, null, ...) user, item or time "
            f"(first at data row {first_row + 1}); drop --strict to skip them"
        )


def duplicate_rows(events: pl.DataFrame) -> pl.Series:
    """`row` of every exact repeat of an earlier event (same user, item, time, session, behaviour).
    Rows are first compared by one 64-bit hash of the whole event, which is cheap in memory; the
    few rows whose hash repeats are then compared exactly."""
    identity = [c for c in ("user", "item", "time", "session", "behavior") if c in events.columns]
    event_hash = events.select(pl.struct(identity).hash()).to_series()
    # equal hashes are neighbours once sorted: much cheaper than a hash table of every event
    ordered = event_hash.sort()
    repeated = ordered.filter(ordered == ordered.shift(1)).unique()
    suspects = events.filter(event_hash.is_in(repeated.implode()))
    # in input order, so that the first of equal events is kept however a bucket's rows arrived
    return suspects.sort("row").filter(~pl.struct(identity).is_first_distinct()).get_column("row")


def counts(frame: pl.DataFrame, *keys: str) -> pl.DataFrame:
    """(keys..., count) over the rows where every key is present. Sorted first: grouping sorted
    keys needs no hash table, which for a million distinct 64-bit codes is the slow part."""
    present = frame.select(*keys).drop_nulls().sort(*keys)
    return present.group_by(*keys, maintain_order=True).agg(pl.len().cast(pl.UInt32).alias("count"))


def summed(parts: list[pl.DataFrame], *keys: str) -> pl.DataFrame:
    """Per-bucket counts added up."""
    return pl.concat(parts).group_by(*keys).agg(pl.col("count").sum())


def most_frequent_values(value_counts: pl.DataFrame, feature: str) -> pl.DataFrame:
    """Per item: the value seen on most rows (ties to the smallest code, for stability) and how
    many distinct values it had."""
    return (
        value_counts.sort(["item", "count", feature], descending=[False, True, False])
        .group_by("item", maintain_order=True)
        .agg(pl.col(feature).first(), pl.len().alias("n_values"))
    )


def item_side_codes(
    item_codes: pl.DataFrame, value_counts: dict[str, pl.DataFrame]
) -> tuple[pl.DataFrame, list[str], dict[str, int]]:
    """item code -> side value codes from each feature's (item, value, count); conflicting
    values of one item resolve to its most frequent one and are counted."""
    side_features = [f for f in SIDE_FEATURES if f in value_counts]
    table = item_codes
    conflicts: dict[str, int] = {}
    for feature in side_features:
        values = most_frequent_values(value_counts[feature], feature)
        conflicts[feature] = values.filter(pl.col("n_values") > 1).height
        table = table.join(values.drop("n_values"), on="item", how="left")
    return table, side_features, conflicts


def counted_vocabulary(code_counts: pl.DataFrame, dictionary_frame: pl.DataFrame) -> pl.DataFrame:
    """(id, raw, count, code) from (code, count): dense ids 1..n by descending count, ties by raw value."""
    return (
        code_counts.join(dictionary_frame, on="code", how="left")
        .sort(["count", "raw"], descending=[True, False])
        .with_row_index("id", offset=1)
        .select(pl.col("id").cast(ID), "raw", pl.col("count").cast(pl.UInt32), "code")
    )


def encode(frame: pl.DataFrame, column: str, vocabulary: pl.DataFrame) -> pl.DataFrame:
    """Replace codes by dense ids (0 where the value is null or not in the vocabulary)."""
    ids = vocabulary.select(pl.col("code").alias(column), "id")
    # only the column is joined: the other columns stay shared instead of being copied
    encoded = frame.select(column).join(ids, on=column, how="left", maintain_order="left").get_column("id")
    return frame.with_columns(encoded.fill_null(0).alias(column))


def build_users(config: PreprocessConfig, vocabularies: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, list[str]]:
    """One row per user id; every non-id column of the users file is a profile field (0 = unknown).
    Adds a `profile.<field>` vocabulary per field."""
    user_ids = vocabularies["user"].select(pl.col("id").alias("user"), "code")
    if config.users is None:
        return user_ids.select("user").sort("user"), []
    table = scan_side_file(config, config.users)
    key = key_column(table, config, "user")
    profile_fields = [column for column in table.columns if column != key]
    (profiles,) = table.collect(
        [table.frame.with_columns(code(key).alias("_code")).unique("_code", keep="first", maintain_order=True)]
    )
    users = user_ids.join(profiles.drop(key), left_on="code", right_on="_code", how="left")
    for field in profile_fields:
        vocabulary = (
            users.get_column(field).drop_nulls().value_counts(name="count").rename({field: "raw"})
            .sort(["count", "raw"], descending=[True, False])
            .with_row_index("id", offset=1)
            .select(pl.col("id").cast(ID), "raw", pl.col("count").cast(pl.UInt32))
        )
        vocabularies[f"profile.{field}"] = vocabulary
        mapping = vocabulary.select(pl.col("raw").alias(field), pl.col("id").alias(f"_{field}"))
        users = users.join(mapping, on=field, how="left").with_columns(pl.col(f"_{field}").fill_null(0).alias(field))
    return users.select("user", *profile_fields).sort("user"), profile_fields


def dense_lookup(keys: pl.Series, values: pl.Series, size: int) -> pl.Series:
    """An array indexed by key (dense ids below `size`) holding `values`, 0 where a key is absent:
    gathering from it costs far less than a join."""
    return pl.zeros(size, values.dtype, eager=True).scatter(keys, values)


def sort_permutation(frame: pl.DataFrame, keys: list[str]) -> pl.Series:
    """The row order that sorts `frame` by `keys`, found as one stable sort per key, the last key
    first (three sorts on one key cost less than one on three) and applied to the rows once."""
    index = pl.int_range(frame.height, dtype=pl.UInt32, eager=True)
    for key in reversed(keys):
        index = index.gather(frame.select(pl.arg_sort_by(pl.col(key).gather(index), maintain_order=True)).to_series())
    return index


def finalise_events(typed: pl.DataFrame, first_order: pl.DataFrame) -> pl.DataFrame:
    """Sort each user's events by time, ties in input order, and number them (`order`) from the
    user's `first_order`, the events of all users with smaller ids: the position the event has
    in all events sorted by (user, time, input row), whatever bucket it is built in.
    A missing session id (session_key) or behaviour is 0."""
    present = typed.rename({"session": "session_key"} if "session" in typed.columns else {})
    # rows still in input order (always with one bucket) need no sort on `row`: the stable sorts keep it
    keys = ["user", "time"] if present.get_column("row").is_sorted() else ["user", "time", "row"]
    ordered = present[sort_permutation(present, keys)]
    users = first_order.get_column("user")
    first_orders = dense_lookup(users, first_order.get_column("first_order"), int(users.max() or 0) + 1)
    # the rows are in user order: a user's rank of an event is its distance from the user's first row
    row_number = pl.int_range(pl.len(), dtype=pl.UInt32)
    user_start = pl.when((pl.col("user") != pl.col("user").shift(1)).fill_null(True)).then(row_number).forward_fill()
    return (
        ordered.with_columns(pl.lit(0).alias(c) for c in ("session_key", "behavior") if c not in ordered.columns)
        .with_columns(
            pl.col("session_key").fill_null(0),
            order=pl.lit(first_orders).gather(pl.col("user")) + row_number - user_start,
        )
        .select(pl.col(name).cast(dtype) for name, dtype in EVENT_SCHEMA.items())
    )


def bucket_item_counts(kept: pl.DataFrame, unique_counts: pl.DataFrame, filters: BucketFilters) -> pl.DataFrame:
    """(item, count) over a bucket's kept events. Without --max-user-events the kept events are the
    unique ones of frequent items, whose counts pass 1 already has: no second sort of every event."""
    if filters.config.max_user_events is None:
        return unique_counts.filter(pl.col("item").is_in(filters.frequent_items.get_column("item").implode()))
    return counts(kept, "item")


@dataclass
class BucketFilters:
    """The filters, applied one bucket at a time: has_ids -> unique (exact duplicates) ->
    frequent_item (--min-item-count) -> normal_user (--max-user-events); each counts on what the
    earlier ones left."""

    config: PreprocessConfig
    duplicates: list[pl.Series]  # per bucket: `row` of every exact repeat of an earlier event
    frequent_items: pl.DataFrame | None = None  # item codes that pass --min-item-count

    def frequent(self, events: pl.LazyFrame, bucket: int) -> pl.DataFrame:
        """The rows that pass has_ids, unique and frequent_item, filtered in one go (one copy)."""
        return events.filter(
            HAS_IDS
            & ~pl.col("row").is_in(self.duplicates[bucket].implode())
            & pl.col("item").is_in(self.frequent_items.get_column("item").implode())
        ).collect()

    def kept(self, frequent: pl.DataFrame) -> pl.DataFrame:
        if self.config.max_user_events is None:
            return frequent
        return frequent.filter(pl.len().over("user") <= self.config.max_user_events)


@dataclass
class KeptEvents:
    """What pass 2 learnt from the kept events: the counts every vocabulary is built from."""

    tallies: dict[str, list[pl.DataFrame]]  # vocabulary -> per-bucket counts
    n_frequent: int  # events left by has_ids, unique and frequent_item
    n_kept: int  # events left by every filter
    time_min_ms: int
    time_max_ms: int
    in_memory: pl.DataFrame | None  # one bucket: its kept events, handed on to pass 3


def build_events(config: PreprocessConfig, layout: Layout, directory: Path) -> EventTables:
    """Write the typed events of every bucket into `directory` (see Layout) and return the rest."""
    scratch = directory / ".scratch"
    parts, dictionaries, rows_read, facts = read_events(config, layout.n_buckets, scratch)
    items_file, item_dictionaries = read_items_file(config) if config.items else (None, {})
    if config.strict:
        check_strict(parts, config)
    filters, item_counts, n_with_ids, n_unique = find_frequent_items(parts, config)
    event_sides = [f for f in SIDE_FEATURES if f in dictionaries]
    kept = tally_kept_events(parts, filters, item_counts, event_sides)
    if kept.n_kept == 0:
        raise InputError(
            f"{config.logs}: no events left after filtering ({rows_read} read); "
            f"lower --min-item-count (now {config.min_item_count})"
        )
    vocabularies, items, side_features, item_stats = build_vocabularies(kept, event_sides, dictionaries, item_dictionaries, items_file)
    users, profile_fields = build_users(config, vocabularies)
    # The raw-value tables grow with the catalogue, not with a bucket: free them before pass 3.
    del dictionaries, item_dictionaries, items_file
    kept.tallies = {}
    write_typed_events(parts, filters, kept, vocabularies, layout, directory)
    del parts
    shutil.rmtree(scratch, ignore_errors=True)

    stats = {
        "rows_read": rows_read,
        "dropped_null_ids": rows_read - n_with_ids,
        "dropped_duplicates": n_with_ids - n_unique,
        "dropped_rare_items": n_unique - kept.n_frequent,
        "dropped_spam_users": kept.n_frequent - kept.n_kept,
        "events": kept.n_kept,
        "users": vocabularies["user"].height,
        "items": vocabularies["item"].height,
        **item_stats,
        "time_min_ms": kept.time_min_ms,
        "time_max_ms": kept.time_max_ms,
        **facts,
    }
    return EventTables(
        items.sort("item"),
        users,
        {name: vocabulary.drop("code", strict=False) for name, vocabulary in vocabularies.items()},
        side_features,
        profile_fields,
        stats,
    )


def find_frequent_items(parts: list[pl.LazyFrame], config: PreprocessConfig) -> tuple[BucketFilters, list[pl.DataFrame], int, int]:
    """Pass 1: every bucket's exact duplicates and the item counts of its unique events, which
    decide the frequent items. Returns the filters, the per-bucket item counts, and the numbers
    of events with ids and of unique events."""
    filters = BucketFilters(config, duplicates=[])
    item_counts, n_with_ids, n_unique = [], 0, 0
    for part in parts:
        with_ids = part.filter(HAS_IDS).collect()
        duplicates = duplicate_rows(with_ids) if not config.keep_duplicates else with_ids.get_column("row").clear()
        filters.duplicates.append(duplicates)
        unique_items = with_ids.lazy().filter(~pl.col("row").is_in(duplicates.implode())).select("item").collect()
        unique_counts = counts(unique_items, "item")
        item_counts.append(unique_counts)
        n_with_ids, n_unique = n_with_ids + with_ids.height, n_unique + int(unique_counts.get_column("count").sum())
        del with_ids
    unique_item_counts = summed(item_counts, "item")
    filters.frequent_items = unique_item_counts.filter(pl.col("count") >= config.min_item_count).select("item")
    return filters, item_counts, n_with_ids, n_unique


def tally_kept_events(
    parts: list[pl.LazyFrame], filters: BucketFilters, item_counts: list[pl.DataFrame], event_sides: list[str]
) -> KeptEvents:
    """Pass 2: what every vocabulary counts, on the kept events. With one bucket, `parts` is
    emptied (only the kept events are needed from here on) and they are kept for pass 3."""
    n_buckets = len(parts)
    tallies: dict[str, list[pl.DataFrame]] = {name: [] for name in ("user", "item", "behavior", *event_sides)}
    n_frequent, n_kept, times = 0, 0, []
    in_memory = None
    for bucket in range(n_buckets):
        frequent = filters.frequent(parts[bucket], bucket)
        if n_buckets == 1:
            parts.clear()
        kept = filters.kept(frequent)
        n_frequent, n_kept = n_frequent + frequent.height, n_kept + kept.height
        del frequent
        for role in ("user", "behavior"):
            if role in kept.columns:
                tallies[role].append(counts(kept, role))
        tallies["item"].append(bucket_item_counts(kept, item_counts[bucket], filters))
        for feature in event_sides:
            tallies[feature].append(counts(kept, "item", feature))
        times.append(kept.select(pl.col("time").min().alias("min"), pl.col("time").max().alias("max")))
        if n_buckets == 1:
            in_memory = kept
        del kept
    time_range = pl.concat(times).select(pl.col("min").min(), pl.col("max").max())
    time_min, time_max = time_range.row(0)
    return KeptEvents(tallies, n_frequent, n_kept, int(time_min or 0), int(time_max or 0), in_memory)


def build_vocabularies(
    kept: KeptEvents,
    event_sides: list[str],
    dictionaries: dict[str, pl.DataFrame],
    item_dictionaries: dict[str, pl.DataFrame],
    items_file: pl.DataFrame | None,
) -> tuple[dict[str, pl.DataFrame], pl.DataFrame, list[str], dict[str, int]]:
    """Every vocabulary (by the kept events' counts; a side value counts the events of its
    items), the items table in dense ids, the side features present, and the items' stats."""
    tallies = kept.tallies
    value_counts = {feature: summed(tallies[feature], "item", feature) for feature in event_sides}
    if items_file is not None:
        value_counts |= {f: counts(items_file, "item", f) for f in SIDE_FEATURES if f in items_file.columns}
    kept_item_counts = summed(tallies["item"], "item")
    side_codes, side_features, conflicts = item_side_codes(kept_item_counts.select("item"), value_counts)
    vocabularies = {
        role: counted_vocabulary(summed(tallies[role], role).rename({role: "code"}), dictionaries[role])
        for role in ("user", "item", "behavior") if tallies[role]
    }
    weighted_side = side_codes.join(kept_item_counts, on="item")
    for feature in side_features:
        known = pl.concat([d[feature] for d in (dictionaries, item_dictionaries) if feature in d]).unique("code")
        side_counts = weighted_side.group_by(feature).agg(pl.col("count").sum()).drop_nulls(feature)
        vocabularies[feature] = counted_vocabulary(side_counts.rename({feature: "code"}), known)

    items = side_codes
    for column in ("item", *side_features):
        items = encode(items, column, vocabularies[column])
    missing_side = 0
    if items_file is not None:
        missing_side = side_codes.join(items_file.select("item").unique(), on="item", how="anti").height
    item_stats = {
        "items_missing_from_items_file": missing_side,
        **{f"item_conflicts_{feature}": count for feature, count in conflicts.items()},
    }
    return vocabularies, items, side_features, item_stats


def write_typed_events(
    parts: list[pl.LazyFrame], filters: BucketFilters, kept_events: KeptEvents,
    vocabularies: dict[str, pl.DataFrame], layout: Layout, directory: Path,
) -> None:
    """Pass 3: the typed events, bucket by bucket, in dense ids and user order."""
    user_counts = vocabularies["user"].select("id", "count")
    first_order = user_counts.select(
        pl.col("id").alias("user"), (pl.col("count").cum_sum() - pl.col("count")).cast(pl.UInt32).alias("first_order")
    )
    for bucket in range(layout.n_buckets):
        if kept_events.in_memory is not None:
            kept, kept_events.in_memory = kept_events.in_memory, None  # the only other reference
        else:
            kept = filters.kept(filters.frequent(parts[bucket], bucket))
        typed = kept.select(*IDS, "row", *(c for c in ("session", "behavior") if c in kept.columns))
        del kept  # each code column below is freed as soon as its ids replace it
        for column in ("user", "item", "behavior"):
            if column in typed.columns:
                typed = encode(typed, column, vocabularies[column])
        layout.write(finalise_events(typed, first_order), directory, "events", bucket)
        del typed
