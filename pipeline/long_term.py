"""Stage 3, long-term sets: what each user did in the `long_window` before a session (paper §3.1).

For session s of a user and each feature f (item, leaf, category, shop, brand), L_f(s) holds the
distinct non-null values of f on the user's events in EARLIER sessions whose time is at least
start(s) - long_window, most recent first, at most `max_long` of them.

Building it from flat arrays in event order (users, then time), with one sort per feature and no
join of events:
1. records: each session is reduced to the last occurrence of each of its values (a null value
   is the value 0, so that every session has at least one record). One sort by (value, event)
   finds them, and with them each record's `next`: the position of the user's next record of the
   same value, in a later session;
2. the records L_f(s) draws from are then one contiguous run, read backwards (most recent first):
   from the last record before s down to the first one at or after the user's first event in the
   window (the first session reaching into the window comes from an as-of join on session end
   times; only when it starts before the window are its events compared with the cutoff);
3. a record of that run is a candidate when its value is not null and does not occur again
   before s (its `next` is s's own first record or later): otherwise the later occurrence stands
   for it. The first `max_long` candidates are L_f(s). Each run is exploded into record
   positions behind a sentinel, s's own first record: the running maximum of the positions is
   that sentinel, which both tests `next` and groups the rows by session, in order and with the
   empty sets.
Most sets are full long before the end of a heavy user's run, so runs are first read only
`SCAN_FACTOR * max_long` records deep, and read whole only for the sets that came out short.
"""

from __future__ import annotations

import polars as pl

from pipeline.events import ID

LONG_TERM_FEATURES = ("item", "leaf", "category", "shop", "brand")
EXPLODED_ROWS_PER_BATCH = 4_000_000  # about 100 MB of exploded positions
SCAN_FACTOR = 2
SHIFT = 1 << 32  # packs (value, event) into one UInt64 sort key


def long_term_column(feature: str) -> str:
    return f"long_{feature}"


def first_positions(lengths: pl.Series) -> pl.Series:
    """Where each of consecutive runs of these lengths starts."""
    return pl.concat([pl.Series([0], dtype=pl.UInt32), lengths.cum_sum().head(-1).cast(pl.UInt32)])


def window_starts(events: pl.DataFrame, sessions: pl.DataFrame, long_window_ms: int | None) -> pl.Series:
    """Per session: the position of its user's first event at or after start - long_window."""
    frame = sessions.select("user", "start", "end", "length", first_event=first_positions(sessions.get_column("length")))
    cutoffs = frame.with_row_index("row").select(
        "row", "user",
        cutoff=(pl.col("start") - long_window_ms) if long_window_ms is not None else pl.lit(-(2**63), pl.Int64),
    )
    first_prior = cutoffs.sort("cutoff").join_asof(
        frame.sort("end", "first_event"), left_on="cutoff", right_on="end", by="user", strategy="forward",
        check_sortedness=False,  # sorted just above; polars cannot verify it per group
    ).sort("row")
    before_cutoff = (
        first_prior.filter(pl.col("start") < pl.col("cutoff"))
        .select("row", "cutoff", event=pl.int_ranges("first_event", pl.col("first_event") + pl.col("length"), dtype=pl.UInt32))
        .explode("event")
        .filter(pl.lit(events.get_column("time")).gather(pl.col("event")) < pl.col("cutoff"))
        .group_by("row", maintain_order=True)
        .agg(pl.len().alias("before"))
    )
    return (
        first_prior.join(before_cutoff, on="row", how="left", maintain_order="left")
        .select(pl.col("first_event") + pl.col("before").fill_null(0))
        .to_series()
    )


def records(events: pl.DataFrame, values: pl.Series) -> tuple[pl.DataFrame, pl.Series]:
    """((value, next) per record, in event order; the number of records before each event).

    Sorted by (value, event), a user's occurrences of a value are adjacent and in time order: a
    record is an occurrence whose successor is in another session, and its `next` is the next
    record when that is still the same value and user."""
    by_value = (
        pl.DataFrame({"value": values})
        .select(key=(pl.col("value").cast(pl.UInt64) * SHIFT + pl.int_range(pl.len(), dtype=pl.UInt64)).sort())
        .select(value=pl.col("key") // SHIFT, event=(pl.col("key") % SHIFT).cast(pl.UInt32))
        .with_columns(
            session=pl.lit(events.get_column("session")).gather(pl.col("event")),
            user=pl.lit(events.get_column("user")).gather(pl.col("event")),
        )
    )
    same_value = pl.col("value") == pl.col("value").shift(-1)
    linked = by_value.filter((~same_value | (pl.col("session") != pl.col("session").shift(-1))).fill_null(True)).select(
        "event", next_event=pl.when(same_value & (pl.col("user") == pl.col("user").shift(-1))).then(pl.col("event").shift(-1))
    )
    record_events = linked.get_column("event")
    n = events.height
    is_record = pl.Series(dtype=pl.Boolean).extend_constant(False, n).scatter(record_events, True)
    records_before = is_record.cast(pl.UInt32).cum_sum() - is_record.cast(pl.UInt32)
    next_event = pl.Series(dtype=pl.UInt32).extend_constant(None, n).scatter(record_events, linked.get_column("next_event"))
    table = pl.DataFrame({"value": values, "next": records_before.gather(next_event)}).filter(is_record)
    return table, records_before


def candidate_sets(table: pl.DataFrame, runs: pl.DataFrame, max_long: int, column: str) -> pl.Series:
    """Per run of record positions (`own`, the sentinel, then `own` - 1 down to `first`): its
    first `max_long` candidates."""
    position, own = pl.col("position"), pl.col("own")
    alive = pl.col("next").is_null() | (pl.col("next") >= own)
    return (
        runs.lazy()
        .select(position=pl.int_ranges("own", pl.col("first") - 1, step=-1, dtype=pl.Int64))
        .explode("position")
        .with_columns(own=position.cum_max().set_sorted(), next=pl.lit(table.get_column("next")).gather(position))
        .filter((position == own) | alive)
        .with_columns(value=pl.lit(table.get_column("value")).gather(position))
        .filter((position == own) | (pl.col("value") != 0))
        .group_by("own", maintain_order=True)
        .agg(pl.col("value").slice(1, max_long).alias(column))
        .collect()
        .get_column(column)
    )


def batched_sets(table: pl.DataFrame, runs: pl.DataFrame, max_long: int, column: str) -> pl.Series:
    """candidate_sets over consecutive slices of `runs` of about EXPLODED_ROWS_PER_BATCH rows."""
    batch = ((pl.col("own") + 1 - pl.col("first")).cum_sum() // EXPLODED_ROWS_PER_BATCH).alias("batch")
    return pl.concat([
        candidate_sets(table, part, max_long, column)
        for part in runs.with_columns(batch).partition_by("batch", maintain_order=True, include_key=False)
    ])


def feature_sets(
    events: pl.DataFrame,
    sessions: pl.DataFrame,
    values: pl.Series,
    window_first_events: pl.Series,
    max_long: int,
    column: str,
) -> pl.Series:
    """The long-term set of each session for one feature's values (0 = null) on the events."""
    table, records_before = records(events, values)
    runs = pl.DataFrame({
        "own": records_before.gather(first_positions(sessions.get_column("length"))).cast(pl.Int64),
        "first": records_before.gather(window_first_events).cast(pl.Int64),
    })
    scan = SCAN_FACTOR * max_long
    shallow = batched_sets(table, runs.with_columns(pl.max_horizontal("first", pl.col("own") - scan)), max_long, column)
    short = (shallow.list.len() < max_long) & (runs.get_column("own") - runs.get_column("first") > scan)
    if not short.any():
        return shallow
    whole = batched_sets(table, runs.with_columns(first=pl.when(short).then("first").otherwise("own")), max_long, column)
    return pl.select(pl.when(short).then(whole).otherwise(shallow)).to_series().alias(column)


def side_values(items: pl.DataFrame, feature: str, item_ids: pl.Series) -> pl.Series:
    """Each event's value of an item side feature (0 when the item has none), looked up in an
    array indexed by item id."""
    size = max(items.get_column("item").max() or 0, item_ids.max() or 0) + 1
    lookup = pl.zeros(size, ID, eager=True).scatter(items.get_column("item"), items.get_column(feature).fill_null(0))
    return lookup.gather(item_ids)


def user_aligned_chunks(sessions: pl.DataFrame, events_per_chunk: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [first, stop) of `sessions` with about `events_per_chunk` events that
    never split a user (a long-term set only looks at its own user's sessions), to bound the
    memory of a step. Rows, not session numbers: a user bucket's sessions are not numbered from 0."""
    users = sessions.with_row_index("row").group_by("user", maintain_order=True).agg(
        pl.col("row").first().alias("first"), pl.col("length").sum().alias("events")
    )
    starts = (
        users.with_columns(chunk=(pl.col("events").cum_sum() - pl.col("events")) // events_per_chunk)
        .group_by("chunk", maintain_order=True).agg(pl.col("first").first())
        .get_column("first").to_list()
    )
    return list(zip(starts, [*starts[1:], sessions.height][: len(starts)], strict=True))


def build_long_term(
    session_events: pl.DataFrame,
    sessions: pl.DataFrame,
    items: pl.DataFrame,
    side_features: list[str],
    long_window_ms: int | None,
    max_long: int,
    events_per_chunk: int = 2_000_000,
) -> pl.DataFrame:
    """One row per session: `session` and a list column per feature (empty when nothing qualifies).
    Expects whole users, sessions numbered consecutively within each user in (user, time) order,
    and events sorted the same way."""
    features = ["item", *side_features]
    event_offsets = [0, *sessions.get_column("length").cum_sum().to_list()]
    parts = []
    for first, stop in user_aligned_chunks(sessions, events_per_chunk):
        # rechunked: a gather from a column of many chunks (one per Parquet row group) is several times slower
        chunk_sessions = sessions.select("session", "user", "start", "end", "length").slice(first, stop - first).rechunk()
        chunk_events = session_events.select("user", "item", "time", "session").slice(
            event_offsets[first], event_offsets[stop] - event_offsets[first]
        ).rechunk()
        window_first_events = window_starts(chunk_events, chunk_sessions, long_window_ms)
        item_ids = chunk_events.get_column("item")
        parts.append(chunk_sessions.select("session").with_columns(
            feature_sets(
                chunk_events, chunk_sessions, item_ids if feature == "item" else side_values(items, feature, item_ids),
                window_first_events, max_long, long_term_column(feature),
            )
            for feature in features
        ))
    if not parts:  # a user bucket without users
        return pl.DataFrame(schema={"session": ID, **{long_term_column(f): pl.List(ID) for f in features}})
    return pl.concat(parts, rechunk=False)
