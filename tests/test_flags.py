"""`--flag-columns`: one-hot flag columns (MovieLens genres) as the category and leaf features."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from helpers.cli import run_sdm
from helpers.logs import (
    BASE_MS,
    KEEP_ALL_ITEMS,
    MINUTE_MS,
    preprocess,
    require_dataset,
    stage_states,
    stats,
    vocabulary,
    write_log,
)
from pipeline.errors import InputError
from pipeline.flags import flag_column_names, flag_features, list_features

COLUMNS = ["item", "title", "A", "B", "C", "year"]


def test_category_is_the_first_set_flag_and_leaf_all_set_flags():
    table = pl.DataFrame(
        {
            "A": ["0", "1", "0", "0", "TRUE", None, "1.0"],
            "B": ["1", "0", "0", " 1 ", "yes", "0", "0"],
            "C": ["1", "0", "0", "0", "1", "", "1"],
        }
    )
    derived = table.select(**flag_features(["A", "B", "C"]))
    assert derived.get_column("category").to_list() == ["B", "A", None, "B", "A", None, "A"]
    assert derived.get_column("leaf").to_list() == ["B|C", "A", None, "B", "A|B|C", None, "A|C"]


def test_flag_column_names_take_ranges_and_lists_in_file_order():
    assert flag_column_names("A..C", COLUMNS, "items.csv") == ["A", "B", "C"]
    assert flag_column_names("C, A", COLUMNS, "items.csv") == ["A", "C"]
    assert flag_column_names("B..C,A,B", COLUMNS, "items.csv") == ["A", "B", "C"]
    assert flag_column_names("title..title", COLUMNS, "items.csv") == ["title"]


@pytest.mark.parametrize(
    ("spec", "named"),
    [("A..D", "'D'"), ("Z", "'Z'"), ("a..C", "'a'"), ("C..A", "'C' comes after 'A'"), (",", "names no column")],
)
def test_bad_flag_column_specs_name_the_problem(spec, named):
    with pytest.raises(InputError, match=named):
        flag_column_names(spec, COLUMNS, "items.csv")


# --- through `sdm preprocess` -----------------------------------------------------------------------


def write_movies(directory: Path) -> dict[str, Path]:
    """Three users watching items 1-4; an items file with three flags (item 4 has none)."""
    events = [(user, item, BASE_MS + (user * 10 + item) * MINUTE_MS) for user in (1, 2, 3) for item in (1, 2, 3, 4)]
    items = [
        (1, "Toy", 0, 1, 1, 1995),
        (2, "Heat", 1, 0, 1, 1995),
        (3, "Babe", 0, 0, 1, 1995),
        (4, "Nil", 0, 0, 0, 1995),
    ]
    return {
        "events": write_log(directory / "events.csv", events),
        "items": write_log(directory / "items.csv", items, header=COLUMNS),
    }


def raw_side_values(out: Path) -> dict[str, tuple[str | None, str | None]]:
    """raw item id -> (raw category, raw leaf)."""
    items = pl.read_parquet(out / "events" / "items.parquet")
    names, categories, leaves = (vocabulary(out, name) for name in ("item", "category", "leaf"))
    return {
        names[item]: (categories.get(category), leaves.get(leaf))
        for item, category, leaf in items.select("item", "category", "leaf").iter_rows()
    }


def test_preprocess_fills_category_and_leaf_from_the_items_files_flags(tmp_path):
    files = write_movies(tmp_path)
    out = tmp_path / "data"
    preprocess(files["events"], out, "--items", files["items"], "--flag-columns", "A..C", *KEEP_ALL_ITEMS)
    assert raw_side_values(out) == {
        "1": ("B", "B|C"),
        "2": ("A", "A|C"),
        "3": ("C", "C"),
        "4": (None, None),  # no flag set: unknown (id 0)
    }
    assert stats(out)["side_features"] == ["leaf", "category"]


def test_a_list_column_gives_its_first_value_as_category_and_the_whole_list_as_leaf():
    table = pl.DataFrame({"genres": ["Adventure|Animation", " Drama ", "(no genres listed)", "", None, "Crime | Film-Noir"]})
    derived = table.select(**list_features("genres"))
    assert derived.get_column("category").to_list() == ["Adventure", "Drama", None, None, None, "Crime"]
    assert derived.get_column("leaf").to_list() == ["Adventure|Animation", "Drama", None, None, None, "Crime|Film-Noir"]


def write_genres_list(directory: Path) -> dict[str, Path]:
    """write_movies' log with a MovieLens-style items file: movieId,title,genres."""
    files = write_movies(directory)
    items = [(1, "Toy", "B|C"), (2, "Heat", "A|C"), (3, "Babe", "C"), (4, "Nil", "(no genres listed)")]
    files["items"] = write_log(directory / "movies.csv", items, header=("movieId", "title", "genres"))
    return files


def test_preprocess_reads_a_genres_list_column_of_the_items_file(tmp_path):
    files = write_genres_list(tmp_path)
    out = tmp_path / "data"
    preprocess(files["events"], out, "--items", files["items"], *KEEP_ALL_ITEMS)
    assert raw_side_values(out) == {"1": ("B", "B|C"), "2": ("A", "A|C"), "3": ("C", "C"), "4": (None, None)}
    assert stats(out)["side_features"] == ["leaf", "category"]


def test_flags_on_the_event_log_are_not_mistaken_for_other_roles(tmp_path):
    # Without --items the flags come from the log; "Action" would otherwise be read as the behaviour.
    rows = [(1, 7, BASE_MS, 1, 0), (1, 8, BASE_MS + MINUTE_MS, 0, 1), (2, 7, BASE_MS, 1, 0), (2, 8, BASE_MS + MINUTE_MS, 1, 1)]
    log = write_log(tmp_path / "events.csv", rows, header=("user", "item", "time", "Action", "Comedy"))
    out = tmp_path / "data"
    preprocess(log, out, "--flag-columns", "Action,Comedy", *KEEP_ALL_ITEMS)
    # Item 8 is Comedy once and Action|Comedy once: a tie resolved by the smallest code, so only
    # item 7 has a fixed value to check; what matters is that category and leaf exist.
    assert raw_side_values(out)["7"] == ("Action", "Action")
    assert not (out / "events" / "vocab" / "behavior.parquet").exists()


def test_changing_the_flag_columns_rebuilds_the_events_stage(tmp_path):
    files = write_movies(tmp_path)
    out = tmp_path / "data"
    common = (files["events"], out, "--items", files["items"], *KEEP_ALL_ITEMS)
    preprocess(*common, "--flag-columns", "A..C")
    assert stage_states(preprocess(*common, "--flag-columns", "A..C").stdout)["events"] == "cached"
    assert stage_states(preprocess(*common, "--flag-columns", "B..C").stdout)["events"] == "built"
    assert raw_side_values(out)["2"] == ("C", "C")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--flag-columns", "A..Westerns"), "'Westerns'"),
        (("--flag-columns", "title"), "flag column 'title' holds 'Toy'"),
        (("--flag-columns", "A..C", "--column", "category=title"), "--flag-columns fills category and leaf"),
    ],
)
def test_bad_flag_options_exit_2_with_one_line(options, message, tmp_path):
    files = write_movies(tmp_path)
    outcome = run_sdm("preprocess", files["events"], "--out", tmp_path / "data", "--items", files["items"], *options)
    assert outcome.exit_code == 2, outcome.output
    assert message in outcome.stderr
    assert len(outcome.stderr.strip().splitlines()) == 1


def test_flags_are_documented_in_preprocess_help():
    outcome = run_sdm("preprocess", "--help")
    assert "--flag-columns" in outcome.stdout


def test_movielens_100k_genres_become_category_and_leaf(tmp_path):
    movielens = require_dataset("movielens_100k")
    out = tmp_path / "ml100k"
    preprocess(
        movielens / "u.data", out, "--items", movielens / "u.item", "--users", movielens / "u.user",
        "--flag-columns", "unknown..Western", "--split", "leave-last-out", "--min-item-count", "1",
    )
    values = raw_side_values(out)
    assert len(values) == 1_682
    assert all(category is not None and leaf is not None for category, leaf in values.values())
    # u.item: 1|Toy Story (1995)|...|0|0|0|1|1|1|0|... -> Animation, Children's, Comedy
    assert values["1"] == ("Animation", "Animation|Children's|Comedy")
    # 2|GoldenEye (1995)|...|0|1|1|0|...|1|0|0 -> Action, Adventure, Thriller
    assert values["2"] == ("Action", "Action|Adventure|Thriller")
    assert len(vocabulary(out, "category")) == 19  # every genre opens some movie's list
