"""Seeded synthetic e-commerce log with planted structure, for `sdm synth`.

The log imitates a Taobao-style behaviour dump so that `sdm preprocess` has something realistic
to chew on, and it plants exactly the signals SDM is built to exploit:

- a catalogue  category -> leaf category -> item, every item with one shop and one brand,
  Zipf-like popularity at every level;
- users with a few favourite categories and, inside each, a favourite brand and shop and a few
  considered items they come back to, that persist for weeks (the long-term behaviour L^u of the
  paper) and occasionally drift;
- sessions with one intent category whose items form runs sharing a leaf, brand or shop
  (order inside the session S^u matters), plus random clicks; many sessions open on a trending
  item unrelated to the intent, so that a short prefix alone often misleads;
- seconds between clicks inside a session, hours to days between a user's sessions.

Everything is drawn with whole-array numpy operations: there is no Python loop over events,
sessions, users or items, so ten million events take about ten seconds on two cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date, datetime, time, timezone
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from pipeline.storage import write_atomic

BEHAVIORS = ("click", "cart", "fav", "buy")
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
GENDERS = ("F", "M", "U")
CITY_TIERS = (1, 2, 3, 4, 5)

AGE_PROBABILITIES = (0.20, 0.36, 0.24, 0.13, 0.07)
GENDER_PROBABILITIES = (0.55, 0.40, 0.05)
CITY_TIER_PROBABILITIES = (0.15, 0.30, 0.25, 0.20, 0.10)

SECONDS_PER_DAY = 86_400

# How an event inside a session picks its item.
FRESH, FOLLOW, NOISE, REPEAT = 0, 1, 2, 3


@dataclass(frozen=True)
class SynthConfig:
    """Size, seed and planted-structure knobs; the defaults give the committed sample_data."""

    n_events: int = 60_000
    seed: int = 0
    n_users: int | None = None  # default: about n_events / 100
    n_items: int | None = None  # default: about n_events / 15, within [500, 2_000_000]
    start: str = "2024-03-01"  # UTC date of the first day
    days: int = 28
    n_categories: int | None = None  # default: grows with the catalogue, within [20, 60]

    # catalogue
    item_zipf_exponent: float = 1.0  # item popularity inside its leaf ~ 1 / rank^exponent
    missing_brand_share: float = 0.03  # unbranded items (empty brand)

    # users
    favourite_categories: int = 2  # preference slots per user, each with a brand and a shop
    profile_tilt: float = 0.7  # sigma of the log-normal tilt of category taste by age x gender
    activity_sigma: float = 1.0  # sigma of the log-normal activity level (sessions per user)
    drift_share: float = 0.5  # users who swap one favourite slot once during the period

    # sessions
    favourite_intent_share: float = 0.85  # sessions whose intent is a favourite category
    preference_strength: float = 0.85  # fresh picks in such sessions from the favourite brand/shop
    consideration_size: int = 4  # items per favourite slot that the user keeps coming back to
    revisit_share: float = 0.7  # fresh picks in favourite sessions that revisit a considered item
    landing_share: float = 0.5  # sessions whose first click is a trending item from anywhere
    follow_share: float = 0.3  # non-first events continuing the current run (leaf/brand/shop)
    noise_share: float = 0.1  # non-first events clicked anywhere in the catalogue
    reuse_share: float = 0.6  # cart/fav/buy events acting on the item just viewed
    session_length_median: float = 3.5
    session_length_sigma: float = 1.0  # log-normal, so the tail passes the 50-item cap
    max_session_length: int = 200

    # time
    click_gap_median_s: float = 40.0  # log-normal gap between events of one session
    click_gap_sigma: float = 1.0
    tie_share: float = 0.03  # events logged in the same second as the previous one
    duplicate_share: float = 0.001  # exact duplicate log lines

    behavior_probabilities: tuple[float, float, float, float] = (0.895, 0.055, 0.03, 0.02)

    def __post_init__(self) -> None:
        if self.n_events < 1 or self.days < 1 or self.favourite_categories < 1 or self.consideration_size < 1:
            raise ValueError("n_events, days, favourite_categories and consideration_size must be positive")
        if self.n_users is not None and self.n_users < 1:
            raise ValueError("n_users must be positive")
        if self.n_items is not None and self.n_items < 16:
            raise ValueError("n_items must be at least 16")
        shares = (
            self.missing_brand_share, self.drift_share, self.favourite_intent_share,
            self.preference_strength, self.revisit_share, self.landing_share, self.follow_share, self.noise_share, self.reuse_share,
            self.tie_share, self.duplicate_share,
        )
        if not all(0.0 <= share <= 1.0 for share in shares):
            raise ValueError("shares must lie in [0, 1]")
        if self.follow_share + self.noise_share > 1.0:
            raise ValueError("follow_share + noise_share must not exceed 1")
        if not math.isclose(sum(self.behavior_probabilities), 1.0):
            raise ValueError("behavior_probabilities must sum to 1")
        date.fromisoformat(self.start)  # raises on anything but a plain YYYY-MM-DD date

    @property
    def user_count(self) -> int:
        return self.n_users if self.n_users is not None else max(1, self.n_events // 100)

    @property
    def item_count(self) -> int:
        return self.n_items if self.n_items is not None else min(2_000_000, max(500, self.n_events // 15))

    @property
    def category_count(self) -> int:
        derived = min(60, max(20, self.item_count // 100)) if self.n_categories is None else self.n_categories
        return max(1, min(derived, self.item_count // 8))  # room for up to 7 leaves of >= 1 item each

    @property
    def start_unix(self) -> int:
        return int(datetime.combine(date.fromisoformat(self.start), time(), timezone.utc).timestamp())

    @property
    def span_s(self) -> int:
        """Last usable second, counted from `start`."""
        return self.days * SECONDS_PER_DAY - 1


@dataclass(frozen=True)
class GroupedSampler:
    """Draws a member of a given group with probability proportional to the member's weight.

    Members are stored grouped, with one running weight total, so a draw is an inverse-CDF
    lookup restricted to the group's slice: one vectorised searchsorted for any number of draws.
    """

    members: np.ndarray  # [M] member ids, grouped
    cumulative: np.ndarray  # [M + 1] running weight total over `members`, starting at 0
    group_start: np.ndarray  # [G + 1] slice of each group in `members`

    @classmethod
    def build(cls, group_of_member: np.ndarray, weight: np.ndarray, n_groups: int) -> GroupedSampler:
        order = np.argsort(group_of_member, kind="stable")
        cumulative = np.concatenate([[0.0], np.cumsum(weight[order], dtype=np.float64)])
        group_start = np.concatenate([[0], np.cumsum(np.bincount(group_of_member, minlength=n_groups))])
        return cls(order, cumulative, group_start)

    def draw(self, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One member per entry of `groups` (every requested group must be non-empty)."""
        first, stop = self.group_start[groups], self.group_start[groups + 1]
        low, high = self.cumulative[first], self.cumulative[stop]
        target = low + rng.random(len(groups)) * (high - low)
        position = np.searchsorted(self.cumulative, target, side="right") - 1
        return self.members[np.clip(position, first, stop - 1)]  # clip guards float ties at the edges


@dataclass(frozen=True)
class Catalogue:
    category_weight: np.ndarray  # [C] popularity, sums to 1
    leaf_category: np.ndarray  # [L]
    item_leaf: np.ndarray  # [I]
    item_category: np.ndarray  # [I]
    item_brand: np.ndarray  # [I] brand index, -1 when unbranded
    item_shop: np.ndarray  # [I]
    item_brand_group: np.ndarray  # [I] id of the item's (category, brand) pair
    item_shop_group: np.ndarray  # [I] id of the item's (category, shop) pair
    n_brands: int
    n_shops: int
    anywhere: GroupedSampler  # single group: the whole catalogue by popularity
    by_category: GroupedSampler
    by_leaf: GroupedSampler
    by_brand_group: GroupedSampler
    by_shop_group: GroupedSampler


@dataclass(frozen=True)
class Users:
    age: np.ndarray  # [U] index into AGE_BUCKETS
    gender: np.ndarray  # [U] index into GENDERS
    city_tier: np.ndarray  # [U] index into CITY_TIERS
    activity: np.ndarray  # [U] relative number of sessions
    # Preference slots [U, K + 1]: a category with a liked (category, brand) and (category, shop)
    # pair inside it. Column K is the newcomer that replaces column drift_slot from drift_time on.
    slot_category: np.ndarray
    slot_brand_group: np.ndarray
    slot_shop_group: np.ndarray
    # [U, K + 1, C]: items of the slot's liked (category, brand) the user considers for weeks and
    # revisits across sessions -- what only the long-term item set can remember.
    slot_considered: np.ndarray
    drift_slot: np.ndarray  # [U]
    drift_time: np.ndarray  # [U] seconds from start; +inf for users whose taste does not drift


def _zipf(n: int, exponent: float) -> np.ndarray:
    """Weights proportional to 1 / rank^exponent for ranks 1..n, summing to 1."""
    weight = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return weight / weight.sum()


def _rank_within_runs(grouped: np.ndarray) -> np.ndarray:
    """0-based position of every element inside its run of equal values."""
    run_first = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
    run_length = np.diff(np.r_[run_first, len(grouped)])
    return np.arange(len(grouped)) - np.repeat(run_first, run_length)


def _dense_pairs(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, int]:
    """Id of each (first, second) pair among the distinct pairs, and how many there are."""
    _, pair_id = np.unique(first.astype(np.int64) * (second.max() + 2) + second + 1, return_inverse=True)
    return pair_id.ravel(), int(pair_id.max()) + 1


def _forward_fill_index(keep: np.ndarray) -> np.ndarray:
    """For every position, the latest position <= it where `keep` holds (position 0 must hold)."""
    return np.maximum.accumulate(np.where(keep, np.arange(len(keep)), 0))


def _assign_sellers(
    n_sellers: int, max_extra_categories: int, item_category: np.ndarray,
    category_weight: np.ndarray, rng: np.random.Generator,
) -> np.ndarray:
    """Give every item a brand (or shop) active in its category.

    Each seller is active in one to 1 + max_extra_categories categories (popular categories attract
    more); the first C sellers cover one category each so no category is left without any.
    Within a category, sellers are chosen with their global Zipf popularity.
    """
    n_categories = len(category_weight)
    primary = rng.choice(n_categories, n_sellers, p=category_weight)
    primary[:n_categories] = np.arange(n_categories)
    extra_seller = np.repeat(np.arange(n_sellers), rng.integers(0, max_extra_categories + 1, n_sellers))
    extra_category = rng.choice(n_categories, len(extra_seller), p=category_weight)
    pair_seller = np.concatenate([np.arange(n_sellers), extra_seller])
    pair_category = np.concatenate([primary, extra_category])
    seller_weight = _zipf(n_sellers, 0.8)
    sellers_of_category = GroupedSampler.build(pair_category, seller_weight[pair_seller], n_categories)
    return pair_seller[sellers_of_category.draw(item_category, rng)]


def _build_catalogue(config: SynthConfig, rng: np.random.Generator) -> Catalogue:
    n_items, n_categories = config.item_count, config.category_count
    category_weight = _zipf(n_categories, 0.9)

    leaf_category = np.repeat(np.arange(n_categories), rng.integers(2, 8, n_categories))  # [L]
    leaf_share = 1.0 / (_rank_within_runs(leaf_category) + 1.0) ** 0.8
    leaf_share /= np.bincount(leaf_category, leaf_share)[leaf_category]
    leaf_weight = category_weight[leaf_category] * leaf_share  # [L] sums to 1

    # Popular leaves list more items, but less than proportionally; every leaf gets at least one.
    n_leaves = len(leaf_category)
    leaf_size = 1 + rng.multinomial(n_items - n_leaves, np.sqrt(leaf_weight) / np.sqrt(leaf_weight).sum())
    item_leaf = np.repeat(np.arange(n_leaves), leaf_size)  # [I] items are stored leaf by leaf
    item_category = leaf_category[item_leaf]
    item_share = 1.0 / (_rank_within_runs(item_leaf) + 1.0) ** config.item_zipf_exponent
    item_share /= np.bincount(item_leaf, item_share)[item_leaf]
    item_weight = leaf_weight[item_leaf] * item_share  # [I] sums to 1

    n_brands = max(n_categories, n_items // 10)
    n_shops = max(n_categories, n_items // 15)
    item_brand = _assign_sellers(n_brands, 2, item_category, category_weight, rng)
    item_brand[rng.random(n_items) < config.missing_brand_share] = -1
    item_shop = _assign_sellers(n_shops, 1, item_category, category_weight, rng)

    item_brand_group, n_brand_groups = _dense_pairs(item_category, item_brand)
    item_shop_group, n_shop_groups = _dense_pairs(item_category, item_shop)
    return Catalogue(
        category_weight=category_weight,
        leaf_category=leaf_category,
        item_leaf=item_leaf,
        item_category=item_category,
        item_brand=item_brand,
        item_shop=item_shop,
        item_brand_group=item_brand_group,
        item_shop_group=item_shop_group,
        n_brands=n_brands,
        n_shops=n_shops,
        anywhere=GroupedSampler.build(np.zeros(n_items, dtype=np.int64), item_weight, 1),
        by_category=GroupedSampler.build(item_category, item_weight, n_categories),
        by_leaf=GroupedSampler.build(item_leaf, item_weight, n_leaves),
        by_brand_group=GroupedSampler.build(item_brand_group, item_weight, n_brand_groups),
        by_shop_group=GroupedSampler.build(item_shop_group, item_weight, n_shop_groups),
    )


def _build_users(config: SynthConfig, catalogue: Catalogue, rng: np.random.Generator) -> Users:
    n_users, n_slots = config.user_count, config.favourite_categories
    n_categories = len(catalogue.category_weight)
    age = rng.choice(len(AGE_BUCKETS), n_users, p=AGE_PROBABILITIES)
    gender = rng.choice(len(GENDERS), n_users, p=GENDER_PROBABILITIES)
    city_tier = rng.choice(len(CITY_TIERS), n_users, p=CITY_TIER_PROBABILITIES)

    # Taste in categories leans with age x gender, so the profile embedding e_u carries signal.
    # Slots are drawn with replacement: a strongly liked category may fill two slots, each with
    # its own brand and shop.
    n_segments = len(AGE_BUCKETS) * len(GENDERS)
    segment = age * len(GENDERS) + gender  # [U]
    taste = catalogue.category_weight * rng.lognormal(0.0, config.profile_tilt, (n_segments, n_categories))
    categories_by_taste = GroupedSampler.build(
        np.repeat(np.arange(n_segments), n_categories), taste.ravel(), n_segments
    )
    slot_category = categories_by_taste.draw(np.repeat(segment, n_slots + 1), rng) % n_categories  # [U*(K+1)]

    # The liked brand (shop) in a category is that of a uniformly drawn item of the category: taste
    # is personal, so niche sellers are liked as often as they are listed, and the pair is sure to
    # have items to offer.
    items_of_category = GroupedSampler.build(
        catalogue.item_category, np.ones(len(catalogue.item_category)), n_categories
    )
    slot_brand_group = catalogue.item_brand_group[items_of_category.draw(slot_category, rng)]
    slot_shop_group = catalogue.item_shop_group[items_of_category.draw(slot_category, rng)]
    slot_considered = catalogue.by_brand_group.draw(np.repeat(slot_brand_group, config.consideration_size), rng)

    drifting = rng.random(n_users) < config.drift_share
    drift_time = np.where(drifting, rng.uniform(0.25, 0.75, n_users) * config.span_s, np.inf)
    return Users(
        age=age,
        gender=gender,
        city_tier=city_tier,
        activity=rng.lognormal(0.0, config.activity_sigma, n_users),
        slot_category=slot_category.reshape(n_users, n_slots + 1),
        slot_brand_group=slot_brand_group.reshape(n_users, n_slots + 1),
        slot_shop_group=slot_shop_group.reshape(n_users, n_slots + 1),
        slot_considered=slot_considered.reshape(n_users, n_slots + 1, config.consideration_size),
        drift_slot=rng.integers(0, n_slots, n_users),
        drift_time=drift_time,
    )


def _draw_session_lengths(config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed session lengths [S] summing to exactly n_events (the last one is cut short)."""
    mean_length = config.session_length_median * math.exp(config.session_length_sigma**2 / 2) + 0.5
    batch_size = int(1.2 * config.n_events / mean_length) + 16
    batches, covered = [], 0
    while covered < config.n_events:  # one batch nearly always suffices
        batch = rng.lognormal(math.log(config.session_length_median), config.session_length_sigma, batch_size)
        batches.append(np.ceil(batch).clip(1, config.max_session_length).astype(np.int64))
        covered += int(batches[-1].sum())
    lengths = np.concatenate(batches)
    total = np.cumsum(lengths)
    n_sessions = int(np.searchsorted(total, config.n_events)) + 1
    lengths = lengths[:n_sessions]
    lengths[-1] -= total[n_sessions - 1] - config.n_events
    return lengths


@dataclass(frozen=True)
class Sessions:
    user: np.ndarray  # [S] owner; a user's sessions are contiguous, in time order
    length: np.ndarray  # [S]
    first_event: np.ndarray  # [S] index of the session's first event
    of_event: np.ndarray  # [N] session of every event
    opens: np.ndarray  # [N] True on the first event of each session


def _lay_out_sessions(config: SynthConfig, users: Users, rng: np.random.Generator) -> Sessions:
    """Cut n_events into sessions and hand them out: every user gets one while sessions last, the
    rest go by activity level, so sessions per user are heavy-tailed too."""
    length = _draw_session_lengths(config, rng)
    n_sessions, n_users = len(length), config.user_count
    user = rng.choice(n_users, n_sessions, p=users.activity / users.activity.sum())
    n_guaranteed = min(n_sessions, n_users)
    user[:n_guaranteed] = rng.permutation(n_users)[:n_guaranteed]

    by_user = np.argsort(user, kind="stable")
    user, length = user[by_user], length[by_user]
    first_event = np.cumsum(length) - length
    opens = np.zeros(config.n_events, dtype=bool)
    opens[first_event] = True
    return Sessions(user, length, first_event, np.repeat(np.arange(n_sessions), length), opens)


def _within_session_cumsum(value: np.ndarray, sessions: Sessions) -> np.ndarray:
    """Running total of value [N], restarting at every session."""
    total = np.cumsum(value)
    first = sessions.first_event[sessions.of_event]  # [N]
    return total - total[first] + value[first]


def _event_modes(
    config: SynthConfig, sessions: Sessions, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mode, behavior, duplicate) of every event [N]: how it picks its item, its behaviour, and
    whether it is an exact copy of the previous log line."""
    n_events = config.n_events
    behavior = rng.choice(len(BEHAVIORS), n_events, p=config.behavior_probabilities).astype(np.int8)
    duplicate = (rng.random(n_events) < config.duplicate_share) & ~sessions.opens
    roll = rng.random(n_events)
    mode = np.full(n_events, FRESH, dtype=np.int8)
    mode[roll < config.noise_share + config.follow_share] = FOLLOW
    mode[roll < config.noise_share] = NOISE
    reuses = (behavior != 0) & (rng.random(n_events) < config.reuse_share)  # cart/buy what was just seen
    mode[reuses] = REPEAT
    mode[duplicate] = REPEAT
    mode[sessions.opens] = FRESH
    behavior = behavior[_forward_fill_index(~duplicate)]
    return mode, behavior, duplicate


def _session_starts(
    config: SynthConfig, sessions: Sessions, duration: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Start second of every session [S], such that a user's sessions never overlap.

    The user's idle time (the period minus the time spent in sessions) is cut at sorted uniform
    points, which makes the idle gaps roughly exponential: hours for heavy users, days for light ones.
    """
    n_sessions = len(sessions.user)
    busy = np.bincount(sessions.user, duration, minlength=config.user_count).astype(np.int64)  # [U]
    idle = np.maximum(config.span_s - busy, 0)
    cut = rng.random(n_sessions)
    cut = cut[np.lexsort((cut, sessions.user))]  # sorted inside each user's block of sessions
    busy_before = np.cumsum(duration) - duration
    busy_before -= busy_before[np.arange(n_sessions) - _rank_within_runs(sessions.user)]
    return np.floor(cut * idle[sessions.user]).astype(np.int64) + busy_before


@dataclass(frozen=True)
class Intents:
    favourite: np.ndarray  # [S] the intent is one of the user's favourite slots
    category: np.ndarray  # [S]
    liked_brand_group: np.ndarray  # [S] meaningful where favourite
    liked_shop_group: np.ndarray  # [S]
    considered: np.ndarray  # [S, C] the slot's considered items, meaningful where favourite


def _session_intents(
    config: SynthConfig, catalogue: Catalogue, users: Users, sessions: Sessions,
    session_start: np.ndarray, rng: np.random.Generator,
) -> Intents:
    """A favourite slot, as it stands at the session's start, or a random category by popularity."""
    n_sessions, n_slots, user = len(sessions.user), config.favourite_categories, sessions.user
    slot_weight = 0.6 ** np.arange(n_slots)
    slot = rng.choice(n_slots, n_sessions, p=slot_weight / slot_weight.sum())
    replaced = (slot == users.drift_slot[user]) & (session_start >= users.drift_time[user])
    slot = np.where(replaced, n_slots, slot)
    favourite = rng.random(n_sessions) < config.favourite_intent_share
    any_category = rng.choice(len(catalogue.category_weight), n_sessions, p=catalogue.category_weight)
    return Intents(
        favourite=favourite,
        category=np.where(favourite, users.slot_category[user, slot], any_category),
        liked_brand_group=users.slot_brand_group[user, slot],
        liked_shop_group=users.slot_shop_group[user, slot],
        considered=users.slot_considered[user, slot],
    )


def _draw_from(
    source: np.ndarray, options: list[tuple[GroupedSampler, np.ndarray]], rng: np.random.Generator
) -> np.ndarray:
    """Entry i drawn by options[source[i]] = (sampler, group of every entry)."""
    drawn = np.empty(len(source), dtype=np.int64)
    for option, (sampler, groups) in enumerate(options):
        chosen = source == option
        drawn[chosen] = sampler.draw(groups[chosen], rng)
    return drawn


def _choose_items(
    config: SynthConfig, catalogue: Catalogue, sessions: Sessions, mode: np.ndarray,
    intents: Intents, rng: np.random.Generator,
) -> np.ndarray:
    """Item of every event [N]."""
    item = np.zeros(config.n_events, dtype=np.int64)

    # FRESH: from the liked brand or shop of a favourite intent, or anything in the intent category.
    # A session opens by browsing the category at large and only then narrows to the user's own
    # brands, shops and considered items: its first clicks show the intent, not the taste, which
    # only earlier sessions (the long-term sets) reveal.
    fresh = np.flatnonzero(mode == FRESH)
    session = sessions.of_event[fresh]
    narrowing = intents.favourite[session] & ~sessions.opens[fresh]
    prefers = narrowing & (rng.random(len(fresh)) < config.preference_strength)
    source = np.where(prefers, np.where(rng.random(len(fresh)) < 0.5, 2, 1), 0)
    item[fresh] = _draw_from(source, [
        (catalogue.by_category, intents.category[session]),
        (catalogue.by_brand_group, intents.liked_brand_group[session]),
        (catalogue.by_shop_group, intents.liked_shop_group[session]),
    ], rng)
    revisits = narrowing & (rng.random(len(fresh)) < config.revisit_share)
    pick = rng.integers(0, config.consideration_size, len(fresh))
    item[fresh] = np.where(revisits, intents.considered[session, pick], item[fresh])

    # FOLLOW: same leaf, brand or shop as the run's anchor, the latest FRESH event (sessions open
    # with one), so neighbouring events resemble each other and order matters.
    follow = np.flatnonzero(mode == FOLLOW)
    anchor_item = item[_forward_fill_index(mode == FRESH)[follow]]
    source = rng.choice(3, len(follow), p=(0.5, 0.3, 0.2))
    item[follow] = _draw_from(source, [
        (catalogue.by_leaf, catalogue.item_leaf[anchor_item]),
        (catalogue.by_brand_group, catalogue.item_brand_group[anchor_item]),
        (catalogue.by_shop_group, catalogue.item_shop_group[anchor_item]),
    ], rng)

    # NOISE: anything, by popularity. LANDING: many sessions open on a trending item from anywhere
    # (a home-page or deal click) before the intent shows; what follows still follows the intent,
    # so a short prefix may say little and the long-term history more. REPEAT: the item of the
    # latest non-REPEAT event.
    noise = np.flatnonzero((mode == NOISE) | (sessions.opens & (rng.random(config.n_events) < config.landing_share)))
    item[noise] = catalogue.anywhere.draw(np.zeros(len(noise), dtype=np.int64), rng)
    return item[_forward_fill_index(mode != REPEAT)]


def _simulate(
    config: SynthConfig, catalogue: Catalogue, users: Users, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, seconds since start, behavior) of every event [N], grouped by user in time order."""
    sessions = _lay_out_sessions(config, users, rng)
    mode, behavior, duplicate = _event_modes(config, sessions, rng)

    gap = np.rint(rng.lognormal(math.log(config.click_gap_median_s), config.click_gap_sigma, config.n_events))
    gap = gap.astype(np.int64)  # [N] seconds since the previous event of the session
    gap[sessions.opens | duplicate] = 0
    duration = _within_session_cumsum(gap, sessions)[sessions.first_event + sessions.length - 1]  # [S]
    session_start = _session_starts(config, sessions, duration, rng)

    intents = _session_intents(config, catalogue, users, sessions, session_start, rng)
    item = _choose_items(config, catalogue, sessions, mode, intents, rng)

    # Ties: some events share the previous event's second. Only between different items, since the
    # same item in the same second is a duplicate line, and those are planted at their own rate.
    # Sessions only get shorter, so they still do not overlap.
    tie = (rng.random(config.n_events) < config.tie_share) & ~sessions.opens & (item != np.roll(item, 1))
    gap[tie] = 0
    elapsed = _within_session_cumsum(gap, sessions)  # [N] seconds since the session's start
    # Only users busier than the whole period overflow it; they are squeezed into its last second.
    seconds = np.minimum(session_start[sessions.of_event] + elapsed, config.span_s)
    return sessions.user[sessions.of_event], item, seconds, behavior


def _raw_ids(n: int, prefix: str, digits: int, rng: np.random.Generator) -> pl.Series:
    """n distinct, ascending, real-looking ids: prefix + zero-padded random number, or (no prefix)
    a plain large integer written as a string."""
    digits = max(digits, len(str(10 * n)))  # room for n distinct values
    low = 0 if prefix else 10 ** (digits - 1)  # plain integers must not start with 0
    step = (10**digits - low) // n
    codes = low + np.arange(n, dtype=np.int64) * step + rng.integers(0, step, n)  # one per stride
    text = pl.Series(codes).cast(pl.String).str.zfill(digits)
    return (prefix + text) if prefix else text


def _shuffled_ids(n: int, prefix: str, digits: int, rng: np.random.Generator) -> pl.Series:
    """Like _raw_ids, but in random order so an id reveals nothing about popularity or grouping."""
    return _raw_ids(n, prefix, digits, rng).gather(rng.permutation(n))


def generate(config: SynthConfig) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Return (events, items, users).

    events: user_id str, item_id str, timestamp i64 (unix seconds), behavior str; sorted by
            timestamp then user_id like a server log; exactly config.n_events rows.
    items:  item_id, leaf_category, category, shop, brand (all str; brand null when unbranded).
    users:  user_id str, age str bucket, gender str F/M/U, city_tier i64 1-5.
    """
    catalogue_rng, user_rng, event_rng, id_rng = (
        np.random.default_rng(child) for child in np.random.SeedSequence(config.seed).spawn(4)
    )
    catalogue = _build_catalogue(config, catalogue_rng)
    users = _build_users(config, catalogue, user_rng)
    user, item, seconds, behavior = _simulate(config, catalogue, users, event_rng)

    # User ids ascend with the user index, so this order is also (timestamp, user_id) as strings.
    # A stable sort keeps the in-session order of events logged in the same second.
    log_order = np.argsort(seconds * config.user_count + user, kind="stable")
    user_ids = _raw_ids(config.user_count, "", 9, id_rng)
    item_ids = _shuffled_ids(config.item_count, "i", 8, id_rng)
    events = pl.DataFrame({
        "user_id": user_ids.gather(user[log_order]),
        "item_id": item_ids.gather(item[log_order]),
        "timestamp": pl.Series(config.start_unix + seconds[log_order], dtype=pl.Int64),
        "behavior": pl.Series(BEHAVIORS).gather(behavior[log_order]),
    })

    leaf_ids = _shuffled_ids(len(catalogue.leaf_category), "lc", 5, id_rng)
    category_ids = _shuffled_ids(len(catalogue.category_weight), "c", 3, id_rng)
    shop_ids = _shuffled_ids(catalogue.n_shops, "s", 6, id_rng)
    brand_ids = _shuffled_ids(catalogue.n_brands, "b", 6, id_rng)
    unbranded = np.flatnonzero(catalogue.item_brand < 0)
    brand = brand_ids.gather(np.maximum(catalogue.item_brand, 0)).scatter(unbranded, None)
    items = pl.DataFrame({
        "item_id": item_ids,
        "leaf_category": leaf_ids.gather(catalogue.item_leaf),
        "category": category_ids.gather(catalogue.item_category),
        "shop": shop_ids.gather(catalogue.item_shop),
        "brand": brand,
    }).sort("item_id")

    users_frame = pl.DataFrame({
        "user_id": user_ids,
        "age": pl.Series(AGE_BUCKETS).gather(users.age),
        "gender": pl.Series(GENDERS).gather(users.gender),
        "city_tier": pl.Series(CITY_TIERS, dtype=pl.Int64).gather(users.city_tier),
    })
    return events, items, users_frame


def write_synth(
    config: SynthConfig, out_dir: Path, fmt: Literal["csv", "csv.gz", "parquet"] = "csv"
) -> dict[str, Path]:
    """Write events/items/users files into out_dir (created if missing) and return their paths.

    Each file is written atomically (pipeline/storage.py), so a reader never sees a half-written
    file. Read csv back with schema_overrides={"user_id": pl.String} to
    keep the numeric user ids as strings; an empty brand reads back as null.
    """
    if fmt not in ("csv", "csv.gz", "parquet"):
        raise ValueError(f"unknown format {fmt!r}; expected csv, csv.gz or parquet")
    frames = dict(zip(("events", "items", "users"), generate(config)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        path = out_dir / f"{name}.{fmt}"
        if fmt == "parquet":
            write_atomic(path, frame.write_parquet)
        else:
            write_atomic(path, lambda handle: frame.write_csv(handle, compression="gzip" if fmt == "csv.gz" else "uncompressed"))
        paths[name] = path
    return paths
