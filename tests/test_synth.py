from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.synth import BEHAVIORS, GroupedSampler, SynthConfig, generate, write_synth

N_EVENTS = 20_000
SESSION_GAP_S = 600  # the paper's 10-minute session rule


@pytest.fixture(scope="module")
def config() -> SynthConfig:
    return SynthConfig(n_events=N_EVENTS, seed=7)


@pytest.fixture(scope="module")
def frames(config: SynthConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    return generate(config)


@pytest.fixture(scope="module")
def log(frames) -> pl.DataFrame:
    """Events joined with item features, per user in time order, cut into 10-minute sessions."""
    events, items, _ = frames
    return (
        events.with_row_index("line")
        .join(items, on="item_id", how="left")
        .sort("user_id", "timestamp", "line")
        .with_columns(gap=pl.col("timestamp").diff().over("user_id"))
        .with_columns(session=(pl.col("gap").is_null() | (pl.col("gap") >= SESSION_GAP_S)).cum_sum())
    )


# --- shape of the output ------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(n_events=st.integers(1, 3_000), seed=st.integers(0, 2**32 - 1))
def test_event_count_is_exact(n_events: int, seed: int) -> None:
    events, _, _ = generate(SynthConfig(n_events=n_events, seed=seed))
    assert events.height == n_events


def test_same_seed_same_frames_and_other_seed_differs(config, frames) -> None:
    again = generate(config)
    for mine, theirs in zip(frames, again):
        assert mine.equals(theirs)
    other_events, _, _ = generate(SynthConfig(n_events=N_EVENTS, seed=config.seed + 1))
    assert not frames[0].equals(other_events)


def test_schemas(frames) -> None:
    events, items, users = frames
    assert events.schema == pl.Schema(
        {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64, "behavior": pl.String}
    )
    item_columns = ("item_id", "leaf_category", "category", "shop", "brand")
    assert items.schema == pl.Schema({name: pl.String for name in item_columns})
    assert users.schema == pl.Schema(
        {"user_id": pl.String, "age": pl.String, "gender": pl.String, "city_tier": pl.Int64}
    )


def test_ids_are_unique_and_every_reference_resolves(frames) -> None:
    events, items, users = frames
    assert items["item_id"].is_unique().all() and users["user_id"].is_unique().all()
    assert events["item_id"].is_in(items["item_id"].implode()).all()
    assert events["user_id"].is_in(users["user_id"].implode()).all()
    assert items["item_id"].str.contains(r"^i\d{8}$").all()
    assert users["user_id"].str.contains(r"^[1-9]\d{8}$").all()


def test_catalogue_hierarchy(frames) -> None:
    _, items, _ = frames
    assert 20 <= items["category"].n_unique() <= 60
    assert items["leaf_category"].n_unique() > items["category"].n_unique()
    categories_per_leaf = items.group_by("leaf_category").agg(pl.col("category").n_unique())["category"]
    assert (categories_per_leaf == 1).all()
    # Brands and shops sell in a few categories each, not everywhere.
    for seller in ("brand", "shop"):
        spread = items.drop_nulls(seller).group_by(seller).agg(pl.col("category").n_unique())["category"]
        assert spread.max() <= 3
    unbranded = items["brand"].is_null().mean()
    assert 0.01 < unbranded < 0.06
    assert items.drop("brand").null_count().sum_horizontal().item() == 0


def test_users_profile_values(frames) -> None:
    _, _, users = frames
    assert set(users["age"].unique()) <= {"18-24", "25-34", "35-44", "45-54", "55+"}
    assert set(users["gender"].unique()) == {"F", "M", "U"}
    assert users["city_tier"].is_between(1, 5).all()
    assert users.null_count().sum_horizontal().item() == 0


def test_behaviors_are_mostly_clicks(frames) -> None:
    behavior = frames[0]["behavior"]
    assert set(behavior.unique()) == set(BEHAVIORS)
    assert 0.8 < (behavior == "click").mean() < 0.97


def test_timestamps_fill_the_period_in_log_order(config, frames) -> None:
    events = frames[0]
    start = int(datetime(2024, 3, 1, tzinfo=timezone.utc).timestamp())
    end = start + config.days * 86_400
    assert events["timestamp"].min() >= start and events["timestamp"].max() < end
    # Activity spans the whole period rather than piling up at one end.
    day = (events["timestamp"] - start) // 86_400
    assert day.n_unique() == config.days
    # Server-log order: timestamp, then user.
    assert events.equals(events.sort("timestamp", "user_id", maintain_order=True))


def test_exact_duplicates_are_rare_but_present(frames) -> None:
    events = frames[0]
    duplicated = events.select("user_id", "item_id", "timestamp").is_duplicated().sum()
    assert 0 < duplicated < 0.005 * events.height


# --- planted structure ----------------------------------------------------------------------------


def test_gaps_are_seconds_within_sessions_and_hours_between(log) -> None:
    gap = log["gap"].drop_nulls()
    assert (gap < SESSION_GAP_S).mean() > 0.7
    assert (gap > 3_600).mean() > 0.05
    within = gap.filter(gap < SESSION_GAP_S)
    assert 20 <= within.median() <= 90
    assert (gap == 0).any()  # some events share a second


def test_session_lengths_are_heavy_tailed(log) -> None:
    length = log.group_by("session").len()["len"]
    assert 4 <= length.mean() <= 10
    assert length.max() > 50  # the paper's 50-item cap gets exercised
    assert (length == 1).mean() > 0.05


def test_sessions_per_user_are_heavy_tailed(log) -> None:
    """Equally active users would give Poisson counts (variance = mean); activity levels differ."""
    per_user = log.group_by("user_id").agg(pl.col("session").n_unique())["session"]
    assert per_user.var() > 3 * per_user.mean()
    assert per_user.max() > 5 * per_user.mean()


def test_item_popularity_is_skewed(frames) -> None:
    events, items, _ = frames
    counts = events["item_id"].value_counts(sort=True)["count"]
    top_decile = counts.head(items.height // 10).sum()
    assert top_decile > 0.4 * events.height


def _top_brand_share(log: pl.DataFrame) -> float:
    """Mean over users with >= 10 branded events of the share taken by their most used brand."""
    return (
        log.drop_nulls("brand")
        .group_by("user_id", "brand").len()
        .group_by("user_id").agg(top=pl.col("len").max(), total=pl.col("len").sum())
        .filter(pl.col("total") >= 10)
        .select((pl.col("top") / pl.col("total")).mean())
        .item()
    )


def test_users_concentrate_on_their_brands(log) -> None:
    shuffled = log.with_columns(brand=pl.col("brand").shuffle(seed=0))
    assert _top_brand_share(log) > 1.8 * _top_brand_share(shuffled)


def test_past_weeks_predict_the_user_next_weeks(config, log) -> None:
    """Brands a user touched in the first half of the period recur in the user's second half far
    more than another user's brands do: the long-term signal SDM's L^u is meant to pick up."""
    halfway = config.start_unix + config.days * 86_400 // 2
    early = log.filter(pl.col("timestamp") < halfway).drop_nulls("brand").select("user_id", "brand").unique()
    late = log.filter(pl.col("timestamp") >= halfway).drop_nulls("brand").select("user_id", "brand")
    late = late.filter(pl.col("user_id").is_in(early["user_id"].implode()))

    users = early["user_id"].unique().sort()
    neighbour = dict(zip(users.to_list(), users.shift(-1, fill_value=users[0]).to_list()))
    borrowed = early.with_columns(pl.col("user_id").replace_strict(neighbour))

    def recurring_share(history: pl.DataFrame) -> float:
        hits = late.join(history.with_columns(seen=pl.lit(True)), on=["user_id", "brand"], how="left")
        return hits["seen"].is_not_null().mean()

    assert recurring_share(early) > 2 * recurring_share(borrowed)


def test_neighbouring_events_share_their_leaf(log) -> None:
    """Order inside a session matters: consecutive items share a leaf more often than the same
    session's items in random order."""

    def same_leaf_share(frame: pl.DataFrame) -> float:
        previous = frame.with_columns(previous=pl.col("leaf_category").shift().over("session"))
        pairs = previous.drop_nulls("previous")
        return (pairs["leaf_category"] == pairs["previous"]).mean()

    rng = np.random.default_rng(0)
    shuffled = log.with_columns(key=pl.Series(rng.random(log.height))).sort("session", "key")
    assert same_leaf_share(log) > same_leaf_share(shuffled) + 0.05


# --- pieces ----------------------------------------------------------------------------------------


def test_grouped_sampler_matches_weights_within_each_group() -> None:
    group = np.array([1, 0, 1, 2, 0, 1])
    weight = np.array([1.0, 3.0, 2.0, 5.0, 1.0, 7.0])
    sampler = GroupedSampler.build(group, weight, n_groups=3)
    rng = np.random.default_rng(0)
    requested = np.repeat([0, 1, 2], 40_000)
    drawn = sampler.draw(requested, rng)
    assert (group[drawn] == requested).all()
    for g in range(3):
        members = np.flatnonzero(group == g)
        expected = weight[members] / weight[members].sum()
        observed = np.bincount(drawn[requested == g], minlength=len(group))[members] / 40_000
        np.testing.assert_allclose(observed, expected, atol=0.01)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_events": 0},
        {"days": 0},
        {"n_items": 5},
        {"noise_share": 1.5},
        {"follow_share": 0.7, "noise_share": 0.4},
        {"start": "March 1st"},
        {"behavior_probabilities": (0.5, 0.2, 0.2, 0.2)},
    ],
)
def test_config_rejects_nonsense(bad: dict) -> None:
    with pytest.raises(ValueError):
        SynthConfig(**bad)


def test_start_and_days_are_honoured() -> None:
    events, _, _ = generate(SynthConfig(n_events=3_000, start="2023-12-30", days=3))
    start = int(datetime(2023, 12, 30, tzinfo=timezone.utc).timestamp())
    assert events["timestamp"].min() >= start and events["timestamp"].max() < start + 3 * 86_400


# --- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_write_synth_round_trips(tmp_path: Path, fmt: str) -> None:
    config = SynthConfig(n_events=3_000, seed=3)
    out_dir = tmp_path / "nested" / "sample"
    paths = write_synth(config, out_dir, fmt)
    assert paths == {name: out_dir / f"{name}.{fmt}" for name in ("events", "items", "users")}
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(p.name for p in paths.values())  # no leftovers

    for path, frame in zip(paths.values(), generate(config)):
        if fmt == "parquet":
            read = pl.read_parquet(path)
        else:
            read = pl.read_csv(path, schema=frame.schema)
        assert read.equals(frame)


def test_write_synth_rejects_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_synth(SynthConfig(n_events=10), tmp_path, "json")  # type: ignore[arg-type]
