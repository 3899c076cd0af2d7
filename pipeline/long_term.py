"""Stage 3, long-term sets: what each user did in the `long_window` before a session (paper §3.1).

For session s of a user and each feature f (item, leaf, category, shop, brand), L_f(s) holds the
distinct non-null values of f on the user's events in EARLIER sessions whose time is at least
start(s) - long_window, most recent first, at most `max_long` of them.

Building it from flat arrays in event order (users, then time), with one sort per feature and no
join of events:
1. records: each session is reduced to the last occurrence of each of its values. One sort by
   (value, index) gives every element the index of the next element with the same value, and
   nothing else: an element is a record when that next occurrence is in a later session (or
   there is none), and it is where the value comes back, so no user or session has to be looked
   up in sorted order. Items are found among the events; a side value's last occurrence in a
   session is the last occurrence of some item there, so side features are found among the item
   records alone (a null value is the value 0: a record, so that every session has at least
   one, but never a candidate);
2. the records L_f(s) draws from are then one contiguous run, read backwards (most recent first):
   from the last record before s down to the first one at or after the user's first event in the
   window, which a binary search of (user, start - window) in the (user, time) order finds;
3. a record of that run is a candidate when its value is not null and does not occur again
   before s (its next occurrence is at s's own first record or later; one in a later user is
   past all of them): otherwise the later occurrence stands for it. The first `max_long`
   candidates are L_f(s). Each run is exploded into record positions behind a sentinel, s's own
   first record: the running maximum of the positions is that sentinel, which both tests `until`
   and groups the rows by session, in order and with the empty sets.
Side features with nearly as many records as the items are read in the item records' runs, where
an item record that is no record of theirs is never a candidate: one explode serves them all
(shop and brand on the synthetic logs). Coarser ones (leaf, category) have runs of their own
records, which are much shorter and seldom fill `max_long` without reading the whole window.
Most sets are full long before the end of a heavy user's run, so runs are first read only
`SCAN_FACTOR * max_long` records deep, and read whole only for the sets that came out short.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import polars as pl

from pipeline.contract import long_term_column
from pipeline.events import ID

EXPLODED_ROWS_PER_BATCH = 2_000_000  # about 16 MB of exploded (position, own), per chunk being built
CHUNKS_AT_ONCE = 2  # user-aligned chunks built concurrently (see build_long_term)
SCAN_FACTOR = 2
SHIFT = 1 << 32  # packs (value, index) into one UInt64 sort key
DENSE_SHARE = 0.75  # see feature_sets
NEVER = 2**32 - 1  # the `until` of a record whose value does not come back


def first_positions(lengths: pl.Series) -> pl.Series:
    """Where each of consecutive runs of these lengths starts."""
    return pl.concat([pl.Series([0], dtype=pl.UInt32), lengths.cum_sum().head(-1).cast(pl.UInt32)])


def window_starts(events: pl.DataFrame, sessions: pl.DataFrame, long_window_ms: int | None) -> pl.Series:
    """Per session: the position of its user's first event at or after start - long_window. The
    events are sorted by (user, time), so a binary search for (user, cutoff) finds it."""
    cutoff = (pl.col("start") - long_window_ms) if long_window_ms is not None else pl.lit(-(2**63), pl.Int64)
    keys = events.select(pl.struct("user", "time")).to_series()
    return keys.search_sorted(sessions.select(pl.struct("user", time=cutoff)).to_series(), side="left")


def next_occurrences(values: pl.Series) -> pl.Series:
    """Per element, the index of the next element with the same value (null: none). Whose user or
    session it is does not matter: a later user's index is past every session of this user, so
    the value stays a candidate for all of them, and an index in the element's own session only
    makes it no record."""
    by_value = (
        pl.DataFrame({"value": values})
        .select(key=(pl.col("value").cast(pl.UInt64) * SHIFT + pl.int_range(pl.len(), dtype=pl.UInt64)).sort())
        .select(value=pl.col("key") // SHIFT, index=(pl.col("key") % SHIFT).cast(pl.UInt32))
        .select("index", next=pl.when(pl.col("value") == pl.col("value").shift(-1)).then(pl.col("index").shift(-1)))
    )
    return pl.Series(dtype=pl.UInt32).extend_constant(None, values.len()).scatter(by_value.get_column("index"), by_value.get_column("next"))


def is_record(sessions: pl.Series, following: pl.Series) -> pl.Series:
    """Whether each element is the last of its value in its session: its next occurrence (from
    next_occurrences) is in a later session, or there is none."""
    return (sessions.gather(following) != sessions).fill_null(True)


def compacted(values: pl.Series, records: pl.Series, following: pl.Series) -> tuple[pl.DataFrame, pl.Series]:
    """((value, until) per record; the number of records before each element of the sequence).
    `until` is the record position of the value's next occurrence (NEVER when none), or 0 when
    the value is null: a record is a candidate for a later session whose first record is `own`
    (so own >= 1) exactly when own <= until, the window and the cap aside."""
    records_before = records.cast(pl.UInt32).cum_sum() - records.cast(pl.UInt32)
    until = pl.when(values != 0).then(records_before.gather(following).fill_null(NEVER)).otherwise(0)
    return pl.DataFrame({"value": values}).select("value", until=until).filter(records), records_before


def uncompacted(values: pl.Series, following: pl.Series) -> pl.DataFrame:
    """(value, until) per element, as `compacted` but keeping the elements that are not records:
    their next occurrence is in their own session, before any later session's first record, so
    they are never candidates, and positions stay those of the sequence."""
    return pl.DataFrame({"value": values}).select("value", until=pl.when(values != 0).then(following.fill_null(NEVER)).otherwise(0))


def candidate_sets(tables: dict[str, pl.DataFrame], runs: pl.DataFrame, max_long: int) -> pl.DataFrame:
    """Per run of record positions (`own`, the sentinel, then `own` - 1 down to `first`): the
    first `max_long` candidates of each feature (column -> (value, until) per position), the runs
    exploded once for all of them."""
    position, own = pl.col("position"), pl.col("own")
    exploded = (
        runs.select(position=pl.int_ranges("own", pl.col("first").cast(pl.Int64) - 1, step=-1, dtype=pl.UInt32))
        .explode("position")
        .select(position, own=position.cum_max().set_sorted())
    )
    return pl.DataFrame({
        column: exploded.filter((position == own) | (pl.lit(table.get_column("until")).gather(position) >= own))
        .with_columns(value=pl.lit(table.get_column("value")).gather(position))
        .group_by("own", maintain_order=True)
        .agg(pl.col("value").slice(1, max_long).alias(column))
        .get_column(column)
        for column, table in tables.items()
    })


def batched_sets(tables: dict[str, pl.DataFrame], runs: pl.DataFrame, max_long: int) -> pl.DataFrame:
    """candidate_sets over consecutive slices of `runs` of about EXPLODED_ROWS_PER_BATCH rows."""
    batch = ((pl.col("own") + 1 - pl.col("first")).cast(pl.Int64).cum_sum() // EXPLODED_ROWS_PER_BATCH).alias("batch")
    return pl.concat([
        candidate_sets(tables, part, max_long)
        for part in runs.with_columns(batch).partition_by("batch", maintain_order=True, include_key=False)
    ])


def long_term_sets(tables: dict[str, pl.DataFrame], runs: pl.DataFrame, max_long: int) -> pl.DataFrame:
    """The long-term set of each session (one per run) for every feature: the runs read
    SCAN_FACTOR * max_long records deep, then whole for each feature's sets that came out short."""
    scan = SCAN_FACTOR * max_long
    shallow = batched_sets(tables, runs.with_columns(pl.max_horizontal("first", pl.col("own").cast(pl.Int64) - scan).cast(pl.UInt32)), max_long)
    deep = runs.get_column("own") - runs.get_column("first") > scan
    columns = []
    for column, table in tables.items():
        short = (shallow.get_column(column).list.len() < max_long) & deep
        if not short.any():
            columns.append(shallow.get_column(column))
            continue
        whole = batched_sets({column: table}, runs.with_columns(first=pl.when(short).then("first").otherwise("own")), max_long)
        columns.append(pl.select(pl.when(short).then(whole.get_column(column)).otherwise(shallow.get_column(column))).to_series().alias(column))
    return pl.DataFrame(columns)


def feature_sets(events: pl.DataFrame, sessions: pl.DataFrame, items: pl.DataFrame, features: list[str],
                 window_first_events: pl.Series, max_long: int) -> pl.DataFrame:
    """The long-term sets of every feature, one row per session.
    A side value's last occurrence in a session is the last occurrence of some item there, so a
    side feature's records are found among the item records alone. One with nearly as many records
    as the items (at least DENSE_SHARE of them) is read in the item records' runs, sharing their
    explode; a coarser one in runs of its own records, which are much shorter."""
    item_following = next_occurrences(events.get_column("item"))
    item_records = is_record(events.get_column("session"), item_following)
    items_table, events_before = compacted(events.get_column("item"), item_records, item_following)
    item_runs = pl.DataFrame({
        "own": events_before.gather(first_positions(sessions.get_column("length"))),
        "first": events_before.gather(window_first_events),
    })
    records = events.select("session", "item").filter(item_records)
    shared, own_spaces = {long_term_column("item"): items_table}, []
    for feature in features[1:]:
        values = side_values(items, feature, records.get_column("item"))
        following = next_occurrences(values)
        feature_records = is_record(records.get_column("session"), following)
        if feature_records.mean() >= DENSE_SHARE:
            shared[long_term_column(feature)] = uncompacted(values, following)
        else:
            table, records_before = compacted(values, feature_records, following)
            runs = item_runs.select(pl.lit(records_before).gather(pl.col(name)).alias(name) for name in ("own", "first"))
            own_spaces.append(({long_term_column(feature): table}, runs))
    sets = pl.concat(
        [long_term_sets(shared, item_runs, max_long), *(long_term_sets(tables, runs, max_long) for tables, runs in own_spaces)],
        how="horizontal",
    )
    return sets.select(long_term_column(feature) for feature in features)


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
    events_per_chunk: int = 750_000,
) -> pl.DataFrame:
    """One row per session: `session` and a list column per feature (empty when nothing qualifies).
    Expects whole users, sessions numbered consecutively within each user in (user, time) order,
    and events sorted the same way."""
    features = ["item", *side_features]
    event_offsets = [0, *sessions.get_column("length").cum_sum().to_list()]

    def chunk_sets(bounds: tuple[int, int]) -> pl.DataFrame:
        first, stop = bounds
        # rechunked: a gather from a column of many chunks (one per Parquet row group) is several times slower
        chunk_sessions = sessions.select("session", "user", "start", "end", "length").slice(first, stop - first).rechunk()
        chunk_events = session_events.select("user", "item", "time", "session").slice(
            event_offsets[first], event_offsets[stop] - event_offsets[first]
        ).rechunk()
        window_first_events = window_starts(chunk_events, chunk_sessions, long_window_ms)
        sets = feature_sets(chunk_events, chunk_sessions, items, features, window_first_events, max_long)
        return pl.concat([chunk_sessions.select("session"), sets], how="horizontal")

    # A chunk is a sequence of many short polars calls, each parallel only within itself: two
    # chunks at a time keep the cores busy between them (polars releases the GIL). 10M events in
    # memory: long_term 4.0-4.5 s instead of 6.4-6.9, the same peak RSS with chunks half as large.
    with ThreadPoolExecutor(CHUNKS_AT_ONCE) as pool:
        parts = list(pool.map(chunk_sets, user_aligned_chunks(sessions, events_per_chunk)))
    if not parts:  # a user bucket without users
        return pl.DataFrame(schema={"session": ID, **{long_term_column(f): pl.List(ID) for f in features}})
    return pl.concat(parts, rechunk=False)
