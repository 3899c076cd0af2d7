"""Every real log in ../shared/datasets is accepted with at most the flags a user would naturally
pass, and the counts agree with the datasets' README and with a plain `csv` reading of the file.
Each test skips when its folder is absent (a fresh clone without ../shared)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers.logs import KEEP_ALL_ITEMS, inspect_user, preprocess, require_dataset, stats, vocabulary


def unix_seconds(text: str) -> int:
    return int(text) * 1000


def utc_datetime(fmt: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return int(datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp() * 1000)

    return parse


@dataclass(frozen=True)
class Dataset:
    folder: str
    logs: str
    options: tuple[str, ...]
    user: str  # column names (or positions of a headerless file) for the reference reading
    item: str | int
    time: str | int
    parse_time: Callable[[str], int] | None  # None: year unknown, compare month and day only
    delimiter: str = ","
    header: bool = True
    readme: dict[str, int] = field(default_factory=dict)  # counts the README states
    side_features: tuple[str, ...] = ()
    profile_fields: tuple[str, ...] = ()


DATASETS = {
    "movielens": Dataset(
        "movielens_100k", "u.data", ("--users", "u.user"), "user", "item", "timestamp", unix_seconds,
        delimiter="|", readme={"rows_read": 100_000, "users": 943, "items": 1_682},
        profile_fields=("age", "gender", "occupation", "zip"),
    ),
    "tmall": Dataset(
        "tmall_ijcai15_head10k", "user_log_format1_head10k.csv", ("--time-format", "%m%d"),
        "user_id", "item_id", "time_stamp", None,
        readme={"rows_read": 10_000, "users": 62, "items": 5_916}, side_features=("category", "shop", "brand"),
    ),
    "rees46": Dataset(
        "rees46_multicat_2019oct_head", "2019-Oct_head.csv", (), "user_id", "product_id", "event_time",
        utc_datetime("%Y-%m-%d %H:%M:%S UTC"), readme={"rows_read": 17_435, "users": 4_505},
        side_features=("leaf", "brand"),
    ),
    "jd": Dataset(
        "jd_sdm_schema_sample", "sample_action.csv", ("--items", "sample_item.csv", "--users", "sample_user.csv"),
        "user_id", "item_id", "action_time", utc_datetime("%Y/%m/%d %H:%M"),
        side_features=("category", "shop", "brand"),
        profile_fields=("age", "sex", "user_lv_cd", "city_level", "province", "city", "county"),
    ),
    "taobao": Dataset(
        "taobao_userbehavior_43users", "UserBehavior_user_sorted_43users.csv",
        ("--no-header", "--columns", "user,item,category,behavior,timestamp"), 0, 1, 4, unix_seconds,
        header=False, readme={"rows_read": 4_321, "users": 43}, side_features=("category",),
    ),
}


def reference_rows(dataset: Dataset, folder: Path) -> list[tuple[str, str, str]]:
    """(user, item, raw time) of every data row, read with the standard library."""
    with open(folder / dataset.logs, newline="") as handle:
        reader = csv.reader(handle, delimiter=dataset.delimiter)
        header = next(reader) if dataset.header else None
        index = {name: header.index(name) for name in (dataset.user, dataset.item, dataset.time)} if header else {}
        columns = [index.get(name, name) for name in (dataset.user, dataset.item, dataset.time)]
        return [tuple(row[k].strip() for k in columns) for row in reader if row]


def month_day(ms: int) -> tuple[int, int]:
    moment = datetime.fromtimestamp(ms / 1000, timezone.utc)
    return moment.month, moment.day


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_is_accepted_with_natural_flags(tmp_path: Path, name: str) -> None:
    dataset = DATASETS[name]
    folder = require_dataset(dataset.folder)
    options = [str(folder / value) if (folder / value).is_file() else value for value in dataset.options]
    out = tmp_path / "out"
    preprocess(folder / dataset.logs, out, *options, *KEEP_ALL_ITEMS)

    rows = reference_rows(dataset, folder)
    summary = stats(out)
    assert {key: summary[key] for key in dataset.readme} == dataset.readme
    assert summary["rows_read"] == len(rows)
    assert summary["users"] == len({user for user, _, _ in rows})
    assert summary["items"] == len({item for _, item, _ in rows})
    assert summary["events"] == summary["rows_read"] - summary["dropped_duplicates"] > 0
    assert summary["side_features"] == list(dataset.side_features)
    assert summary["profile_fields"] == list(dataset.profile_fields)

    if dataset.parse_time is not None:
        times = [dataset.parse_time(raw) for _, _, raw in rows]
        assert (summary["time_min_ms"], summary["time_max_ms"]) == (min(times), max(times))
    else:  # "829" = Aug 29: compare month and day, the year is not in the data
        days = sorted((int(raw) // 100, int(raw) % 100) for _, _, raw in rows)
        assert (month_day(summary["time_min_ms"]), month_day(summary["time_max_ms"])) == (days[0], days[-1])

    assert stats(out, "sessions")["sessions"] >= summary["users"]
    first_user = rows[0][0]
    sessions = inspect_user(out, first_user)["sessions"]
    seen = {item for session in sessions for item in session["items"]}
    assert seen == {item for user, item, _ in rows if user == first_user}


def test_tmall_float_brand_ids_are_kept_as_written(tmp_path: Path) -> None:
    folder = require_dataset("tmall_ijcai15_head10k")
    preprocess(folder / "user_log_format1_head10k.csv", tmp_path / "out", "--time-format", "%m%d", *KEEP_ALL_ITEMS)
    brands = set(vocabulary(tmp_path / "out", "brand").values())
    assert "2661.0" in brands and "2661" not in brands


def test_jd_sample_items_file_with_cr_line_endings_is_read(tmp_path: Path) -> None:
    """The JD sample's items file (CR-only, trailing empty column) describes other items than the
    action file: every action item is counted as missing from it, none invented."""
    folder = require_dataset("jd_sdm_schema_sample")
    out = tmp_path / "out"
    preprocess(folder / "sample_action.csv", out, "--items", folder / "sample_item.csv", *KEEP_ALL_ITEMS)
    with open(folder / "sample_item.csv", newline="") as handle:
        described = {row["item_id"] for row in csv.DictReader(handle)}
    action_items = {item for _, item, _ in reference_rows(DATASETS["jd"], folder)}
    assert len(described) == 99  # the file was split into its 99 rows
    assert stats(out)["items_missing_from_items_file"] == len(action_items - described)
