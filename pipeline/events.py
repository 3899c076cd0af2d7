"""Stage 1, events: typed and filtered events with dense ids, plus items, users and vocabularies.

Raw values are strings and stay exact ("007" and "7" are different items), but strings are slow
to compare, so all the heavy work (deduplication, counting, filters, joins) runs on their 64-bit
hashes; each column's dictionary (hash -> raw string) is built in the same scan of the file and
checked for collisions, so the result is exact.

Dense ids start at 1 (0 is padding / unknown) and follow descending frequency, ties broken by
the raw value, so that id order is the popularity order a log-uniform negative sampler assumes
and ids do not depend on the order of the input rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from pipeline.config import PreprocessConfig
from pipeline.errors import InputError
from pipeline.reading import (
    ALL_ROLES,
    EVENT_ROLES,
    SIDE_FEATURES,
    Table,
    find_column,
    resolve_roles,
    scan_table,
    time_expression,
    time_kind,
    unparsed_time_error,
)

ID = pl.UInt32
EVENT_SCHEMA = {"user": ID, "item": ID, "time": pl.Int64, "session_key": pl.UInt64, "behavior": ID, "order": pl.UInt32}
CATEGORICAL_ROLES = ("user", "item", "session", "behavior", *SIDE_FEATURES)


@dataclass
class EventTables:
    events: pl.DataFrame  # EVENT_SCHEMA, sorted by (user, time, input row); `order` = row position
    items: pl.DataFrame  # item, then one id column per side feature present
    users: pl.DataFrame  # user, then one id column per profile field
    vocabularies: dict[str, pl.DataFrame]  # name -> (id, raw, count)
    side_features: list[str]
    profile_fields: list[str]
    stats: dict[str, int]


def code(column: str) -> pl.Expr:
    """The 64-bit hash standing in for a raw string value; null stays null."""
    return pl.when(pl.col(column).is_not_null()).then(pl.col(column).hash())


def dictionary(frame: pl.LazyFrame, column: str) -> pl.LazyFrame:
    """(code, raw, collides): every distinct raw value of a column under its code."""
    raw = pl.col("raw")
    return (
        frame.select(code(column).alias("code"), pl.col(column).alias("raw"))
        .drop_nulls()
        .group_by("code")
        .agg(raw.min(), (raw.min() != raw.max()).alias("collides"))
    )


def checked(dictionary_frame: pl.DataFrame, table: Table, column: str) -> pl.DataFrame:
    if dictionary_frame.get_column("collides").any():
        raise RuntimeError(
            f"{table.path}: two distinct values of column '{column}' share a 64-bit hash; "
            "this is astronomically rare, please report it with the file"
        )
    return dictionary_frame.select("code", "raw")


def read_events(config: PreprocessConfig) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Events as codes (user, item, time in ms, optional roles, `row` = input order) and each
    categorical role's dictionary."""
    table = scan_table(config.logs, sep=config.sep, header=config.header, columns=config.columns)
    roles = resolve_roles(table, config.column_map, ALL_ROLES)
    time_column = roles["time"]
    time = time_expression(time_column, config.time_format, time_kind(table, time_column))
    categorical = {role: column for role, column in roles.items() if role in CATEGORICAL_ROLES}
    events_query = table.frame.select(
        *(code(column).alias(role) for role, column in categorical.items()), time.alias("time")
    ).with_row_index("row")
    required_missing = pl.any_horizontal(pl.col(roles[role]).is_null() for role in ("user", "item", "time"))
    problems_query = table.frame.select(
        (pl.col(time_column).is_not_null() & time.is_null()).sum().alias("unparsed_times"),
        required_missing.sum().alias("missing_ids"),
    )
    events, problems, *dictionaries = table.collect(
        [events_query, problems_query, *(dictionary(table.frame, column) for column in categorical.values())]
    )
    unparsed_times, missing_ids = problems.row(0)
    if unparsed_times:
        raise unparsed_time_error(table, time_column, time, unparsed_times, config.time_format)
    if missing_ids and (malformed := table.locate_malformed_line()):
        raise InputError(f"{table.path}: malformed input ({malformed})")
    return events, {
        role: checked(frame, table, column) for (role, column), frame in zip(categorical.items(), dictionaries, strict=True)
    }


def read_items_file(config: PreprocessConfig) -> tuple[pl.DataFrame, dict[str, pl.DataFrame]]:
    """Items file as codes: item -> side feature codes, with the side features' dictionaries."""
    table = scan_table(config.items)
    key = key_column(table, config, "item")
    roles = {
        role: column for role in SIDE_FEATURES
        if (column := find_column(table.columns, role, config.column_map, EVENT_ROLES[role])) not in (None, key)
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


def check_strict(events: pl.DataFrame, config: PreprocessConfig) -> None:
    """--strict: a row with an empty user, item or time is an error, not a dropped row."""
    missing = events.filter(pl.any_horizontal(pl.col(c).is_null() for c in ("user", "item", "time")))
    if missing.height:
        raise InputError(
            f"{config.logs}: {missing.height} rows have an empty user, item or time "
            f"(first at data row {missing.get_column('row')[0] + 1}); drop --strict to skip them"
        )


def duplicate_rows(events: pl.DataFrame) -> pl.Series:
    """`row` of every exact repeat of an earlier event (same user, item, time, session, behaviour).
    Rows are first compared by one 64-bit hash of the whole event, which is cheap in memory; the
    few rows whose hash repeats are then compared exactly."""
    identity = [c for c in ("user", "item", "time", "session", "behavior") if c in events.columns]
    hashed = events.select("row", *identity, pl.struct(identity).hash().alias("event_hash"))
    repeated = hashed.filter(~pl.col("event_hash").is_first_distinct()).get_column("event_hash").unique()
    suspects = hashed.filter(pl.col("event_hash").is_in(repeated.implode()))
    return suspects.filter(~pl.struct(identity).is_first_distinct()).get_column("row")


def filter_masks(events: pl.DataFrame, config: PreprocessConfig) -> list[pl.Expr]:
    """One boolean column per filter, each applied on top of the previous ones, so that every
    count refers to what the earlier filters left:
    has_ids -> unique (exact duplicates) -> frequent_item (--min-item-count) -> normal_user
    (--max-user-events)."""
    has_ids = pl.all_horizontal(pl.col(c).is_not_null() for c in ("user", "item", "time"))
    unique = pl.col("has_ids")
    if not config.keep_duplicates:
        unique = unique & ~pl.col("row").is_in(duplicate_rows(events).implode())
    frequent_item = pl.col("unique") & (pl.col("unique").sum().over("item") >= config.min_item_count)
    normal_user = pl.col("frequent_item")
    if config.max_user_events is not None:
        normal_user = normal_user & (pl.col("frequent_item").sum().over("user") <= config.max_user_events)
    return [has_ids.alias("has_ids"), unique.alias("unique"), frequent_item.alias("frequent_item"), normal_user.alias("kept")]


def apply_filters(events: pl.DataFrame, config: PreprocessConfig) -> tuple[pl.DataFrame, dict[str, int]]:
    """The kept events and how many rows each filter dropped."""
    has_ids, unique, frequent_item, kept = filter_masks(events, config)
    marked = events.with_columns(has_ids).with_columns(unique).with_columns(frequent_item).with_columns(kept)
    counts = marked.select(pl.col("has_ids", "unique", "frequent_item", "kept").sum()).row(0, named=True)
    dropped = {
        "dropped_null_ids": events.height - counts["has_ids"],
        "dropped_duplicates": counts["has_ids"] - counts["unique"],
        "dropped_rare_items": counts["unique"] - counts["frequent_item"],
        "dropped_spam_users": counts["frequent_item"] - counts["kept"],
    }
    return marked.filter("kept").drop("has_ids", "unique", "frequent_item", "kept"), dropped


def most_frequent_values(source: pl.DataFrame, feature: str) -> pl.DataFrame:
    """Per item: the value seen on most rows (ties to the smallest code, for stability) and how
    many distinct values it had."""
    return (
        source.select("item", feature).drop_nulls()
        .group_by("item", feature).len()
        .sort(["item", "len", feature], descending=[False, True, False])
        .group_by("item", maintain_order=True)
        .agg(pl.col(feature).first(), pl.len().alias("n_values"))
    )


def item_side_codes(
    events: pl.DataFrame, items_file: pl.DataFrame | None
) -> tuple[pl.DataFrame, list[str], dict[str, int]]:
    """item code -> side value codes. The items file wins for the features it has; conflicting
    values of one item resolve to its most frequent one and are counted."""
    sources = {f: events for f in SIDE_FEATURES if f in events.columns}
    if items_file is not None:
        sources |= {f: items_file for f in SIDE_FEATURES if f in items_file.columns}
    side_features = [f for f in SIDE_FEATURES if f in sources]
    table = events.select(pl.col("item").unique())
    conflicts: dict[str, int] = {}
    for feature in side_features:
        values = most_frequent_values(sources[feature], feature)
        conflicts[feature] = values.filter(pl.col("n_values") > 1).height
        table = table.join(values.drop("n_values"), on="item", how="left")
    return table, side_features, conflicts


def frequency_vocabulary(codes: pl.Series, dictionary_frame: pl.DataFrame) -> pl.DataFrame:
    """(id, raw, count, code): dense ids 1..n by descending count, ties by raw value."""
    return (
        codes.drop_nulls().value_counts(name="count").rename({codes.name: "code"})
        .join(dictionary_frame, on="code", how="left")
        .sort(["count", "raw"], descending=[True, False])
        .with_row_index("id", offset=1)
        .select(pl.col("id").cast(ID), "raw", pl.col("count").cast(pl.UInt32), "code")
    )


def encode(frame: pl.DataFrame, column: str, vocabulary: pl.DataFrame) -> pl.DataFrame:
    """Replace codes by dense ids (0 where the value is null or not in the vocabulary)."""
    ids = vocabulary.select(pl.col("code").alias(column), pl.col("id").alias("_id"))
    return (
        frame.join(ids, on=column, how="left", maintain_order="left")
        .with_columns(pl.col("_id").fill_null(0).alias(column))
        .drop("_id")
    )


def build_users(config: PreprocessConfig, vocabularies: dict[str, pl.DataFrame]) -> tuple[pl.DataFrame, list[str]]:
    """One row per user id; every non-id column of the users file is a profile field (0 = unknown).
    Adds a `profile.<field>` vocabulary per field."""
    user_ids = vocabularies["user"].select(pl.col("id").alias("user"), "code")
    if config.users is None:
        return user_ids.select("user").sort("user"), []
    table = scan_table(config.users)
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


def finalise_events(typed: pl.DataFrame) -> pl.DataFrame:
    """Sort each user's events by time, ties in input order, and number them (`order`).
    A missing session id (session_key) or behaviour is 0."""
    present = typed.rename({"session": "session_key"} if "session" in typed.columns else {})
    return (
        present.with_columns(pl.lit(0).alias(c) for c in ("session_key", "behavior") if c not in present.columns)
        .with_columns(pl.col("session_key").fill_null(0))
        .sort(["user", "time", "row"])
        .with_row_index("order")
        .select(pl.col(name).cast(dtype) for name, dtype in EVENT_SCHEMA.items())
    )


def build_events(config: PreprocessConfig) -> EventTables:
    events, dictionaries = read_events(config)
    rows_read = events.height
    items_file, item_dictionaries = read_items_file(config) if config.items else (None, {})

    if config.strict:
        check_strict(events, config)
    kept, dropped = apply_filters(events, config)
    del events
    if kept.height == 0:
        raise InputError(
            f"{config.logs}: no events left after filtering ({rows_read} read); "
            f"lower --min-item-count (now {config.min_item_count})"
        )

    side_codes, side_features, conflicts = item_side_codes(kept, items_file)
    vocabularies = {role: frequency_vocabulary(kept.get_column(role), dictionaries[role]) for role in ("user", "item")}
    weighted_side = kept.select("item").join(side_codes, on="item", how="left")
    for feature in side_features:
        known = pl.concat([d[feature] for d in (dictionaries, item_dictionaries) if feature in d]).unique("code")
        vocabularies[feature] = frequency_vocabulary(weighted_side.get_column(feature), known)
    if "behavior" in kept.columns:
        vocabularies["behavior"] = frequency_vocabulary(kept.get_column("behavior"), dictionaries["behavior"])

    items = side_codes
    for column in ("item", *side_features):
        items = encode(items, column, vocabularies[column])
    users, profile_fields = build_users(config, vocabularies)

    typed = kept.select("user", "item", "time", "row", *(c for c in ("session", "behavior") if c in kept.columns))
    for column in ("user", "item", "behavior"):
        if column in typed.columns:
            typed = encode(typed, column, vocabularies[column])
    events_out = finalise_events(typed)

    missing_side = 0
    if items_file is not None:
        missing_side = side_codes.join(items_file.select("item").unique(), on="item", how="anti").height
    stats = {
        "rows_read": rows_read,
        **dropped,
        "events": events_out.height,
        "users": vocabularies["user"].height,
        "items": vocabularies["item"].height,
        "items_missing_from_items_file": missing_side,
        **{f"item_conflicts_{feature}": count for feature, count in conflicts.items()},
    }
    return EventTables(
        events_out,
        items.sort("item"),
        users,
        {name: vocabulary.drop("code", strict=False) for name, vocabulary in vocabularies.items()},
        side_features,
        profile_fields,
        stats,
    )
