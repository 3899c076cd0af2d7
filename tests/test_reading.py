"""Reading raw logs (formats, delimiters, column roles, timestamps) and the events stage
(filters, dense ids), asserted on what `sdm preprocess` writes."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pytest

from helpers.cli import run_sdm
from helpers.logs import (
    BASE_MS,
    DAY_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    preprocess,
    raw_events,
    sessions_of,
    stats,
    vocabulary,
    write_log,
)

ROWS = [("007", "7", BASE_MS), ("7", "007", BASE_MS + 1_000), ("007", "x", BASE_MS + 2_000)]


def utc_ms(*parts: int) -> int:
    return int(datetime(*parts, tzinfo=timezone.utc).timestamp() * 1000)


def events_as_rows(out: Path) -> set[tuple[str, str, int]]:
    return set(raw_events(out).iter_rows())


# --- formats and delimiters ---------------------------------------------------------------------


@pytest.mark.parametrize("sep", [",", "\t", "|", ";", "::"], ids=["comma", "tab", "pipe", "semicolon", "double-colon"])
def test_delimiter_is_detected(tmp_path: Path, sep: str) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS, sep=sep)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_sep_overrides_a_misleading_detection(tmp_path: Path) -> None:
    # Every line holds more commas than pipes, so detection alone would split on commas.
    rows = [("u1", "a,b,c,d", BASE_MS), ("u1", "e,f,g,h", BASE_MS + 1_000)]
    logs = write_log(tmp_path / "events.psv", rows, sep="|")
    preprocess(logs, tmp_path / "out", "--sep", "|", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(rows)


def test_quoted_fields_may_contain_the_delimiter(tmp_path: Path) -> None:
    logs = tmp_path / "events.csv"
    logs.write_text(
        "user,item,title,time\n"
        f'u1,a,"Shoes, red",{BASE_MS}\n'
        f"u1,b,plain,{BASE_MS + 1_000}\n"
        f'u2,a,"x, y, z",{BASE_MS + 2_000}\n'
    )
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == {("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 1_000),
                                                 ("u2", "a", BASE_MS + 2_000)}


def test_headerless_file_with_columns_keeps_its_first_row(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", [(u, i, "pv", t) for u, i, t in ROWS], header=None)
    preprocess(logs, tmp_path / "out", "--no-header", "--columns", "user,item,behavior,time", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_movielens_1m_files_are_read_as_grouplens_ships_them(tmp_path: Path) -> None:
    # `::` between fields, no header in any file, and Latin-1 titles in movies.dat.
    (tmp_path / "ratings.dat").write_text("".join(f"{u}::{i}::4::{BASE_MS // 1000 + 60 * k}\n" for k, (u, i) in
                                                  enumerate([(1, 10), (1, 20), (2, 10), (2, 30)])))
    (tmp_path / "movies.dat").write_bytes("10::Toy Story (1995)::Animation|Comedy\n20::Misérables, Les (1995)::Drama\n"
                                          "30::Heat (1995)::Action|Crime\n".encode("latin-1"))
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    preprocess(tmp_path / "ratings.dat", tmp_path / "out", "--no-header", "--columns", "user,item,rating,time",
               "--items", tmp_path / "movies.dat", "--items-columns", "item,title,genres",
               "--users", tmp_path / "users.dat", "--users-columns", "user,gender,age,occupation,zip", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == {("1", "10", BASE_MS), ("1", "20", BASE_MS + 60_000),
                                                 ("2", "10", BASE_MS + 120_000), ("2", "30", BASE_MS + 180_000)}
    assert stats(tmp_path / "out")["side_features"] == ["leaf", "category"]
    assert stats(tmp_path / "out")["profile_fields"] == ["gender", "age", "occupation", "zip"]
    categories = vocabulary(tmp_path / "out", "category").values()
    assert {"Animation", "Drama", "Action"} <= set(categories)  # the Latin-1 title's row is read, not refused


AMAZON_REVIEWS = [  # Amazon's 2018 review files: JSON lines, nested fields, day-resolution unix times
    {"overall": 5.0, "verified": True, "reviewerID": "A1", "asin": "B01", "style": {"Size:": " L"},
     "reviewText": "fits,\n\"great\"", "unixReviewTime": 1472688000, "image": ["http://x"]},
    {"overall": 3.0, "verified": False, "reviewerID": "A1", "asin": "B02", "unixReviewTime": 1472774400, "vote": "1,234"},
    {"overall": 4.0, "verified": True, "reviewerID": "A2", "asin": "B01", "unixReviewTime": 1472688000},
]
REVIEW_EVENTS = {("A1", "B01", 1472688000000), ("A1", "B02", 1472774400000), ("A2", "B01", 1472688000000)}


@pytest.mark.parametrize("name", ["Beauty.json", "Beauty.json.gz", "reviews.ndjson", "reviews.txt"])
def test_json_lines_are_read_by_name_or_content(tmp_path: Path, name: str) -> None:
    text = "".join(json.dumps(review) + "\n" for review in AMAZON_REVIEWS).encode()
    logs = tmp_path / name
    logs.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == REVIEW_EVENTS
    assert stats(tmp_path / "out")["rating_column"] == "overall"


def test_a_json_array_and_list_fields_in_parquet_are_read(tmp_path: Path) -> None:
    (tmp_path / "reviews.json").write_text(json.dumps(AMAZON_REVIEWS))
    preprocess(tmp_path / "reviews.json", tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == REVIEW_EVENTS
    # An items file whose genres are a list (JSON lines here, Parquet below): category = first, leaf = all.
    items = [{"asin": "B01", "genres": ["Beauty", "Skin"], "details": {"w": 1}}, {"asin": "B02", "genres": []}]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    pl.DataFrame(items[:1]).drop("details").write_parquet(tmp_path / "meta.parquet")
    for meta in ("meta.jsonl", "meta.parquet"):
        out = tmp_path / f"out-{meta}"
        preprocess(tmp_path / "reviews.json", out, "--items", tmp_path / meta, *KEEP_ALL_ITEMS)
        assert set(vocabulary(out, "category").values()) == {"Beauty"}
        assert set(vocabulary(out, "leaf").values()) == {"Beauty|Skin"}


def test_malformed_json_is_one_line_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "reviews.jsonl").write_text(json.dumps(AMAZON_REVIEWS[0]) + "\n{\"reviewerID\": \"A2\", \n")
    outcome = run_sdm("preprocess", tmp_path / "reviews.jsonl", "--out", tmp_path / "out")
    assert outcome.exit_code == 2 and "reviews.jsonl" in outcome.stderr
    assert "Traceback" not in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1


def test_sep_takes_a_few_characters_but_not_a_sentence(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.txt", ROWS, sep="||")
    preprocess(logs, tmp_path / "out", "--sep", "||", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)
    refused = run_sdm("preprocess", logs, "--out", tmp_path / "refused", "--sep", "|||||")
    assert refused.exit_code == 2 and "--sep '|||||'" in refused.stderr


def test_side_file_columns_need_their_file(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS)
    refused = run_sdm("preprocess", logs, "--out", tmp_path / "out", "--items-columns", "item,genres")
    assert refused.exit_code == 2 and "--items-columns names the columns of --items" in refused.stderr


def test_gzipped_csv(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv.gz", ROWS)
    assert gzip.decompress(logs.read_bytes()).startswith(b"user,item,time")
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_parquet_with_integer_times(tmp_path: Path) -> None:
    logs = tmp_path / "events.parquet"
    pl.DataFrame({"user_id": [u for u, _, _ in ROWS], "item_id": [i for _, i, _ in ROWS],
                  "timestamp": [t // 1000 for _, _, t in ROWS]}).write_parquet(logs)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


@pytest.mark.parametrize("zone", [None, "UTC", "Europe/Berlin"])
def test_parquet_with_datetime_column(tmp_path: Path, zone: str | None) -> None:
    # 2023-11-14 22:13:20 wall-clock time; in Berlin (UTC+1 in November) that is 21:13:20 UTC.
    wall = [datetime(2023, 11, 14, 22, 13, 20), datetime(2023, 11, 14, 22, 14, 20)]
    frame = pl.DataFrame({"user": ["u1", "u1"], "item": ["a", "b"], "time": wall})
    if zone is not None:
        frame = frame.with_columns(pl.col("time").dt.replace_time_zone(zone))
    frame.write_parquet(tmp_path / "events.parquet")
    preprocess(tmp_path / "events.parquet", tmp_path / "out", *KEEP_ALL_ITEMS)
    offset_ms = 3_600_000 if zone == "Europe/Berlin" else 0
    expected = utc_ms(2023, 11, 14, 22, 13, 20) - offset_ms
    assert raw_events(tmp_path / "out").get_column("time").to_list() == [expected, expected + MINUTE_MS]


@pytest.mark.parametrize("newline", ["\r\n", "\r"], ids=["crlf", "cr-only"])
def test_windows_and_old_mac_line_endings(tmp_path: Path, newline: str) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS, newline=newline)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)  # no stray "\r" in ids or times


def test_trailing_empty_column(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", [(*row, None) for row in ROWS], header=("user", "item", "time", ""))
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_leading_unnamed_index_column(tmp_path: Path) -> None:
    rows = [(index, *row) for index, row in enumerate(ROWS)]
    logs = write_log(tmp_path / "events.csv", rows, header=("", "user", "item", "time"))
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_ids_are_kept_as_exact_strings(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert sorted(vocabulary(tmp_path / "out", "item").values()) == ["007", "7", "x"]
    assert sorted(vocabulary(tmp_path / "out", "user").values()) == ["007", "7"]
    assert sessions_of(tmp_path / "out", "007") == [["7", "x"]]


# --- timestamps -----------------------------------------------------------------------------------

T0 = utc_ms(2018, 2, 4, 8, 28)
TIME_SPELLINGS = {
    "unix-seconds": ([str(T0 // 1000), str(T0 // 1000 + 60)], []),
    "unix-milliseconds": ([str(T0), str(T0 + MINUTE_MS)], []),
    "iso-space": (["2018-02-04 08:28:00", "2018-02-04 08:29:00"], []),
    "iso-t": (["2018-02-04T08:28:00", "2018-02-04T08:29:00"], []),
    "iso-fraction-z": (["2018-02-04T08:28:00.000Z", "2018-02-04T08:29:00.000Z"], []),
    "iso-offset": (["2018-02-04T09:28:00+01:00", "2018-02-04T09:29:00+01:00"], []),
    "utc-suffix": (["2018-02-04 08:28:00 UTC", "2018-02-04 08:29:00 UTC"], []),
    "slashes-no-padding": (["2018/2/4 8:28", "2018/2/4 8:29"], []),
    "unix-seconds-as-float": ([f"{T0 // 1000}.0", f"{T0 // 1000 + 59}.9996"], []),  # pandas writes an int column with NaN so
    "goodreads": (["Sun Feb 04 00:28:00 -0800 2018", "Sun Feb 04 09:29:00 +0100 2018"], []),
    "time-format": (["04.02.2018 08:28", "04.02.2018 08:29"], ["--time-format", "%d.%m.%Y %H:%M"]),
}


@pytest.mark.parametrize("spelling", TIME_SPELLINGS)
def test_time_spellings(tmp_path: Path, spelling: str) -> None:
    times, options = TIME_SPELLINGS[spelling]
    logs = write_log(tmp_path / "events.csv", [("u1", "a", times[0]), ("u1", "b", times[1])], sep=";")
    preprocess(logs, tmp_path / "out", *options, *KEEP_ALL_ITEMS)
    assert raw_events(tmp_path / "out").get_column("time").to_list() == [T0, T0 + MINUTE_MS]


def test_month_day_format_without_leading_zero(tmp_path: Path) -> None:
    # Tmall writes Aug 29 as 829 and Jan 1 as 101; the year is unknown, so only month and day count.
    rows = [("u1", "a", "829"), ("u1", "b", "830"), ("u1", "c", "1111"), ("u2", "d", "101")]
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", "--time-format", "%m%d", *KEEP_ALL_ITEMS)
    times = dict(raw_events(tmp_path / "out").select("item", "time").iter_rows())
    month_day = {item: (datetime.fromtimestamp(ms / 1000, timezone.utc).month,
                        datetime.fromtimestamp(ms / 1000, timezone.utc).day) for item, ms in times.items()}
    assert month_day == {"a": (8, 29), "b": (8, 30), "c": (11, 11), "d": (1, 1)}
    assert times["b"] - times["a"] == DAY_MS


# --- column roles ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        ("user_id", "item_id", "timestamp"),
        ("UserID", "ItemID", "Time"),
        ("uid", "sku", "ts"),
        ("visitorid", "product_id", "event_time"),
        ("reviewerID", "asin", "unixReviewTime"),  # Amazon 2018
        ("userId", "venueId", "utcTimestamp"),  # Foursquare check-ins
        ("user_id", "book_id", "date_added"),  # Goodreads
        ("用户ID", "商品ID", "时间戳"),  # a Chinese export
    ],
)
def test_roles_found_by_common_names(tmp_path: Path, header: tuple[str, str, str]) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS, header=header)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_side_features_found_by_their_chinese_names(tmp_path: Path) -> None:
    rows = [("u1", "a", "华为", "1788515", "电子产品", "pv", BASE_MS), ("u1", "b", "全友", "2884020", "家居用品", "buy", BASE_MS + 1)]
    logs = write_log(tmp_path / "events.csv", rows, header=("用户ID", "商品ID", "品牌", "商品类目ID", "商品类别", "行为类型", "时间戳"))
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == {("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 1)}
    assert stats(tmp_path / "out")["side_features"] == ["leaf", "category", "brand"]
    assert set(vocabulary(tmp_path / "out", "brand").values()) == {"华为", "全友"}


def test_roles_found_in_any_column_order_among_other_columns(tmp_path: Path) -> None:
    rows = [(t, "5", i, u) for u, i, t in ROWS]
    logs = write_log(tmp_path / "events.csv", rows, header=("timestamp", "rating", "item_id", "user_id"))
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_column_option_names_the_roles(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", ROWS, header=("who", "what", "when"))
    preprocess(logs, tmp_path / "out", "--column", "user=who", "--column", "item=what", "--column", "time=when",
               *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == set(ROWS)


def test_column_option_wins_over_a_common_name(tmp_path: Path) -> None:
    rows = [(u, i, "sku-" + i, t) for u, i, t in ROWS]
    logs = write_log(tmp_path / "events.csv", rows, header=("user", "item_id", "sku", "time"))
    preprocess(logs, tmp_path / "out", "--column", "item=sku", *KEEP_ALL_ITEMS)
    assert events_as_rows(tmp_path / "out") == {(u, "sku-" + i, t) for u, i, t in ROWS}


def test_config_file_sets_columns_and_parameters(tmp_path: Path) -> None:
    rows = [("u1", "a", "04.02.2018 08:28"), ("u1", "b", "04.02.2018 08:34"), ("u1", "c", "04.02.2018 08:35")]
    logs = write_log(tmp_path / "events.csv", rows, header=("who", "what", "when"))
    config = tmp_path / "sdm.toml"
    config.write_text(
        "[preprocess]\n"
        'column = { user = "who", item = "what", time = "when" }\n'
        'time_format = "%d.%m.%Y %H:%M"\n'
        'session_gap = "5m"\n'
        "min_item_count = 1\n"
    )
    preprocess(logs, tmp_path / "out", "--config", config)
    # a 6-minute gap splits only because the config's 5m replaced the default 10m
    assert sessions_of(tmp_path / "out", "u1") == [["a"], ["b", "c"]]


def test_command_line_wins_over_config_file(tmp_path: Path) -> None:
    rows = [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 6 * MINUTE_MS)]
    logs = write_log(tmp_path / "events.csv", rows)
    config = tmp_path / "sdm.toml"
    config.write_text('[preprocess]\nsession_gap = "5m"\nmin_item_count = 1\n')
    preprocess(logs, tmp_path / "out", "--config", config, "--session-gap", "10m")
    assert sessions_of(tmp_path / "out", "u1") == [["a", "b"]]


# --- events stage: filters and dense ids ----------------------------------------------------------


def counted_rows(counts: dict[str, int], user: str = "u1") -> list[tuple[str, str, int]]:
    """`count` events of each item, one second apart."""
    items = [item for item, count in counts.items() for _ in range(count)]
    return [(user, item, BASE_MS + index * 1_000) for index, item in enumerate(items)]


def test_min_item_count_default_is_five(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", counted_rows({"five": 5, "four": 4}))
    preprocess(logs, tmp_path / "out")
    assert set(vocabulary(tmp_path / "out", "item").values()) == {"five"}
    assert stats(tmp_path / "out")["dropped_rare_items"] == 4


def test_min_item_count_option(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", counted_rows({"three": 3, "two": 2, "one": 1}))
    preprocess(logs, tmp_path / "out", "--min-item-count", "2")
    assert set(vocabulary(tmp_path / "out", "item").values()) == {"three", "two"}
    assert stats(tmp_path / "out")["dropped_rare_items"] == 1


def test_max_user_events_drops_spam_users(tmp_path: Path) -> None:
    rows = counted_rows({"a": 1, "b": 1, "c": 1}, user="busy") + counted_rows({"a": 1, "b": 1}, user="calm")
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", "--max-user-events", "2", *KEEP_ALL_ITEMS)
    assert set(vocabulary(tmp_path / "out", "user").values()) == {"calm"}
    assert stats(tmp_path / "out")["dropped_spam_users"] == 3


def test_exact_duplicates_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [("u1", "a", BASE_MS), ("u1", "a", BASE_MS), ("u1", "a", BASE_MS + 1_000), ("u1", "b", BASE_MS)]
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert sorted(raw_events(tmp_path / "out").iter_rows()) == sorted(set(rows))
    assert stats(tmp_path / "out")["dropped_duplicates"] == 1
    preprocess(logs, tmp_path / "kept", "--keep-duplicates", *KEEP_ALL_ITEMS)
    assert raw_events(tmp_path / "kept").height == 4


def test_null_ids_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [("u1", "a", BASE_MS), (None, "a", BASE_MS + 1), ("u1", None, BASE_MS + 2), ("u1", "b", None),
            ("u1", "b", BASE_MS + 3)]
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert sorted(raw_events(tmp_path / "out").iter_rows()) == [("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 3)]
    assert stats(tmp_path / "out")["dropped_null_ids"] == 3
    assert stats(tmp_path / "out")["rows_read"] == 5


def test_missing_value_markers_in_id_columns_are_missing(tmp_path: Path) -> None:
    # R writes NA, pandas NaN, SQL NULL: as an id they would merge every such row into one user or item.
    rows = [("u1", "a", BASE_MS), ("NA", "a", BASE_MS + 1), ("u1", "NULL", BASE_MS + 2), ("None", "b", BASE_MS + 3),
            ("u1", "NaN", BASE_MS + 4), ("u1", "b", BASE_MS + 5), ("NAN", "b", BASE_MS + 6)]
    preprocess(write_log(tmp_path / "events.csv", rows), tmp_path / "out", *KEEP_ALL_ITEMS)
    assert sorted(raw_events(tmp_path / "out").iter_rows()) == [("NAN", "b", BASE_MS + 6), ("u1", "a", BASE_MS), ("u1", "b", BASE_MS + 5)]
    assert stats(tmp_path / "out")["dropped_null_ids"] == 4


def test_a_log_without_users_takes_each_session_as_its_user(tmp_path: Path) -> None:
    # YOOCHOOSE's clicks: no header, session, time, item, category and no user column.
    rows = [(session, BASE_MS + session * DAY_MS + click * MINUTE_MS, f"i{(session + click) % 4}", "c1")
            for session in (11, 12, 13) for click in range(3)]
    logs = write_log(tmp_path / "clicks.dat", rows, header=None)
    outcome = preprocess(logs, tmp_path / "out", "--no-header", "--columns", "session,time,item,category", *KEEP_ALL_ITEMS)
    assert sorted(vocabulary(tmp_path / "out", "user").values()) == ["11", "12", "13"]
    for session in (11, 12, 13):
        assert sessions_of(tmp_path / "out", str(session)) == [[f"i{(session + click) % 4}" for click in range(3)]]
    assert stats(tmp_path / "out")["user_column"] is None and stats(tmp_path / "out")["users_from_sessions"] == 9
    assert "no user column: each session is its own user" in outcome.stderr


def test_events_without_a_user_are_the_user_of_their_session(tmp_path: Path) -> None:
    # Diginetica: a logged-in user's sessions carry their id, an anonymous session's "NA".
    rows = [(session, user, f"i{(session + click) % 4}", BASE_MS + session * DAY_MS + click * MINUTE_MS)
            for session, user in ((1, "u7"), (2, "NA"), (3, "u7"), (4, "")) for click in range(2)]
    logs = write_log(tmp_path / "views.csv", rows, header=("sessionId", "userId", "itemId", "timestamp"), sep=";")
    outcome = preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    users = raw_events(tmp_path / "out").group_by("user").len()
    assert dict(users.iter_rows()) == {"u7": 4, "session 2": 2, "session 4": 2}
    assert stats(tmp_path / "out")["users_from_sessions"] == 4 and stats(tmp_path / "out")["user_column"] == "userId"
    assert "4 events (50% of the rows) have no 'userId': each is taken as the user of its session" in outcome.stderr


def test_strict_makes_null_ids_an_error(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", [("u1", "a", BASE_MS), (None, "a", BASE_MS + 1)])
    outcome = run_sdm("preprocess", logs, "--out", tmp_path / "out", "--strict", *KEEP_ALL_ITEMS)
    assert outcome.exit_code == 2
    assert "Traceback" not in outcome.stderr and outcome.stderr.strip()


def test_ids_follow_descending_frequency_and_zero_is_padding(tmp_path: Path) -> None:
    rows = (counted_rows({"c": 1, "a": 2, "b": 3}, user="light")
            + counted_rows({"b": 1, "a": 1, "c": 1, "d": 1, "e": 1}, user="heavy"))
    logs = write_log(tmp_path / "events.csv", rows)
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    items = {raw: id_ for id_, raw in vocabulary(tmp_path / "out", "item").items()}
    assert items["b"] == 1 and items["a"] == 2 and items["c"] == 3  # 4, 3 and 2 events
    assert {items["d"], items["e"]} == {4, 5}
    users = {raw: id_ for id_, raw in vocabulary(tmp_path / "out", "user").items()}
    assert users == {"light": 1, "heavy": 2}  # 6 events vs 5
    events = pl.read_parquet(tmp_path / "out" / "events" / "events.parquet")
    assert events.get_column("item").min() == 1 and events.get_column("user").min() == 1


def test_ids_are_dense(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", counted_rows({f"i{k}": k % 3 + 1 for k in range(10)}))
    preprocess(logs, tmp_path / "out", *KEEP_ALL_ITEMS)
    assert sorted(vocabulary(tmp_path / "out", "item")) == list(range(1, 11))


def test_users_file_profile_fields(tmp_path: Path) -> None:
    logs = write_log(tmp_path / "events.csv", [(user, "a", BASE_MS) for user in ("u1", "u2", "u3", "stranger")])
    users = write_log(tmp_path / "users.csv", [("u1", "25-34", "F"), ("u2", "25-34", "M"), ("u3", "45+", None)],
                      header=("user_id", "age", "gender"))
    preprocess(logs, tmp_path / "out", "--users", users, *KEEP_ALL_ITEMS)
    assert stats(tmp_path / "out")["profile_fields"] == ["age", "gender"]
    ids = {raw: id_ for id_, raw in vocabulary(tmp_path / "out", "user").items()}
    profiles = {row["user"]: (row["age"], row["gender"])
                for row in pl.read_parquet(tmp_path / "out" / "events" / "users.parquet").iter_rows(named=True)}
    age, gender = {user: profiles[ids[user]][0] for user in ids}, {user: profiles[ids[user]][1] for user in ids}
    assert age["u1"] == age["u2"] != age["u3"] and 0 not in (age["u1"], age["u3"])
    assert gender["u1"] != gender["u2"] and 0 not in (gender["u1"], gender["u2"])
    assert gender["u3"] == 0 and age["stranger"] == gender["stranger"] == 0  # unknown
