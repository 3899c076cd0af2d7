"""Plain-Python references of the preprocessing rules and the ranking metrics.

Obviously correct and slow: one event, session or case at a time, written from the rules in the
issues (and the module docstrings of pipeline/sessions.py, long_term.py, splits.py and
sdm/evaluation/metrics.py), never from the vectorised code. The tests compare `sdm preprocess` and
`sdm.evaluation.metrics` against them on many logs and rankings.

Everything here speaks raw ids (the strings of the input log) and per-user indices, so that the
references do not depend on the dense ids or the global session numbers the pipeline assigns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DAY_MS = 86_400_000
METRIC_NAMES = ("hit_rate", "recall", "precision", "f1", "ndcg", "mrr")


@dataclass(frozen=True)
class Event:
    """One row of a raw log; None is an empty field. `side` maps a side feature to its value."""

    user: str | None
    item: str | None
    time: int | None  # unix milliseconds
    session_id: str | None = None
    side: tuple[tuple[str, str | None], ...] = ()
    row: int = 0  # position in the input file

    def side_value(self, feature: str) -> str | None:
        return dict(self.side).get(feature)


# --- stage 1: which events are kept ---------------------------------------------------------------


def kept_events(
    rows: Sequence[Event], min_item_count: int = 1, max_user_events: int | None = None, keep_duplicates: bool = False
) -> list[Event]:
    """The events `sdm preprocess` keeps, in input order: rows with a user, item and time; not an
    exact repeat (user, item, time, session id) of an earlier row; of an item seen at least
    `min_item_count` times among those; of a user with at most `max_user_events` of the rest."""
    complete = [event for event in rows if None not in (event.user, event.item, event.time)]
    unique: list[Event] = []
    seen: set[tuple] = set()
    for event in complete:
        identity = (event.user, event.item, event.time, event.session_id)
        if keep_duplicates or identity not in seen:
            unique.append(event)
        seen.add(identity)
    item_counts: dict[str, int] = {}
    for event in unique:
        item_counts[event.item] = item_counts.get(event.item, 0) + 1
    frequent = [event for event in unique if item_counts[event.item] >= min_item_count]
    user_counts: dict[str, int] = {}
    for event in frequent:
        user_counts[event.user] = user_counts.get(event.user, 0) + 1
    return [event for event in frequent if max_user_events is None or user_counts[event.user] <= max_user_events]


def timelines(events: Sequence[Event]) -> dict[str, list[Event]]:
    """Each user's events by time, ties in input order."""
    by_user: dict[str, list[Event]] = {}
    for event in sorted(events, key=lambda event: event.row):
        by_user.setdefault(event.user, []).append(event)
    return {user: sorted(timeline, key=lambda event: (event.time, event.row)) for user, timeline in by_user.items()}


def item_side_values(events: Sequence[Event], feature: str) -> dict[str, str]:
    """item -> its side value on the kept events (the logs the tests generate give an item at most
    one value, sometimes left empty on a row)."""
    values: dict[str, str] = {}
    for event in events:
        value = event.side_value(feature)
        if value is not None:
            assert values.setdefault(event.item, value) == value, "the generated log gave an item two values"
    return values


# --- stage 2: sessions ------------------------------------------------------------------------------


def sessions(timeline: Sequence[Event], session_gap_ms: int, max_session_length: int) -> list[list[Event]]:
    """Adjacent events stay together when they share a session id or are less than the gap apart;
    a session holding `max_session_length` events is closed."""
    result: list[list[Event]] = []
    for previous, event in zip([None, *timeline], timeline):
        together = previous is not None and (
            event.time - previous.time < session_gap_ms
            or (event.session_id is not None and event.session_id == previous.session_id)
        )
        if together and len(result[-1]) < max_session_length:
            result[-1].append(event)
        else:
            result.append([event])
    return result


# --- stage 3: long-term sets ------------------------------------------------------------------------


def long_term_sets(
    user_sessions: Sequence[Sequence[Event]], values: dict[str, str] | None, long_window_ms: int | None, max_long: int
) -> list[list[str]]:
    """For each session: the distinct values on the user's events in earlier sessions no older than
    the window before the session start, most recent first, at most `max_long`. `values` maps an
    item to its side value (None: the item id itself)."""
    result = []
    for index, session in enumerate(user_sessions):
        start = session[0].time
        earlier = [event for previous in user_sessions[:index] for event in previous]
        in_window = [event for event in earlier if long_window_ms is None or event.time >= start - long_window_ms]
        chosen: list[str] = []
        for event in reversed(in_window):
            value = event.item if values is None else values.get(event.item)
            if value is not None and value not in chosen:
                chosen.append(value)
        result.append(chosen[:max_long])
    return result


# --- stage 4: splits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainRow:
    user: str
    session: int  # index of the session among the user's sessions
    items: tuple[str, ...]
    next_item: str | None


@dataclass(frozen=True)
class Case:
    user: str
    session: int  # index of the session whose long-term sets go with the input
    items: tuple[str, ...]
    targets: tuple[str, ...]
    first_target: int  # index of the first target event in the user's timeline


def training_rows(user: str, kept_sessions: Sequence[tuple[int, Sequence[Event]]]) -> list[TrainRow]:
    """(session index, its training events) in order -> rows; `next_item` is the first item of the
    next such session; a row with one item and no next item predicts nothing and is dropped."""
    rows = []
    for position, (index, events) in enumerate(kept_sessions):
        following = kept_sessions[position + 1][1][0].item if position + 1 < len(kept_sessions) else None
        if len(events) >= 2 or following is not None:
            rows.append(TrainRow(user, index, tuple(event.item for event in events), following))
    return rows


def temporal_split(
    user_sessions: dict[str, list[list[Event]]], test_days: float, valid_days: float, input_fraction: float
) -> dict[str, list]:
    """The last `test_days` (counted back from the end of the last event's UTC day) are test, the
    `valid_days` before them validation; a session starting in a period with at least two events
    is a case: its first max(1, floor(length * input_fraction)) items are the input, the rest
    (deduplicated, first occurrence order) the targets. Training: events before validation."""
    last_time = max(event.time for user in user_sessions.values() for session in user for event in session)
    test_start = (last_time // DAY_MS + 1) * DAY_MS - round(test_days * DAY_MS)
    valid_start = test_start - round(valid_days * DAY_MS)
    result: dict[str, list] = {"train": [], "valid": [], "test": []}
    for user, user_session_list in user_sessions.items():
        offsets = [sum(len(session) for session in user_session_list[:index]) for index in range(len(user_session_list))]
        training = [(index, [e for e in session if e.time < valid_start]) for index, session in enumerate(user_session_list)]
        result["train"] += training_rows(user, [(index, events) for index, events in training if events])
        for index, session in enumerate(user_session_list):
            start = session[0].time
            period = "test" if start >= test_start else "valid" if start >= valid_start else None
            if period is None or len(session) < 2:
                continue
            n_input = max(1, math.floor(len(session) * input_fraction))
            targets: list[str] = []
            for event in session[n_input:]:
                if event.item not in targets:
                    targets.append(event.item)
            items = tuple(event.item for event in session[:n_input])
            result[period].append(Case(user, index, items, tuple(targets), offsets[index] + n_input))
    return result


def leave_last_out_split(user_sessions: dict[str, list[list[Event]]]) -> dict[str, list]:
    """Each user's last event is the test target (users with 2+ events) and the one before it the
    validation target (3+ events). The input is the earlier items of the target's session or, when
    the target opens a session, the user's whole previous session (no case without one)."""
    result: dict[str, list] = {"train": [], "valid": [], "test": []}
    for user, user_session_list in user_sessions.items():
        located = [(index, position) for index, session in enumerate(user_session_list) for position in range(len(session))]
        n_events = len(located)
        held_out = {"test": n_events - 1 if n_events >= 2 else None, "valid": n_events - 2 if n_events >= 3 else None}
        held = {event_index for event_index in held_out.values() if event_index is not None}
        training, event_index = [], 0
        for index, session in enumerate(user_session_list):
            kept = [event for position, event in enumerate(session) if event_index + position not in held]
            event_index += len(session)
            if kept:
                training.append((index, kept))
        result["train"] += training_rows(user, training)
        for split, target in held_out.items():
            if target is None:
                continue
            index, position = located[target]
            target_item = user_session_list[index][position].item
            if position > 0:
                items, session = [e.item for e in user_session_list[index][:position]], index
            elif index > 0:
                items, session = [e.item for e in user_session_list[index - 1]], index - 1
            else:
                continue
            result[split].append(Case(user, session, tuple(items), (target_item,), target))
    return result


# --- metrics ----------------------------------------------------------------------------------------


def metrics_reference(topk_lists: list[list[int]], targets: list[list[int]], ks: Sequence[int]) -> dict:
    """The definitions of sdm.evaluation.metrics.ranking_metrics, one case at a time."""
    result = {}
    for k in ks:
        totals = dict.fromkeys(METRIC_NAMES, 0.0)
        for ranking, truth in zip(topk_lists, targets):
            truth = set(truth)
            hit_ranks = [rank for rank, item in enumerate(ranking[:k], start=1) if item in truth]
            hits = len(hit_ranks)
            precision, recall = hits / k, hits / len(truth)
            totals["hit_rate"] += hits > 0
            totals["recall"] += recall
            totals["precision"] += precision
            totals["f1"] += 2 * precision * recall / (precision + recall) if hits else 0.0
            dcg = sum(1 / math.log2(rank + 1) for rank in hit_ranks)
            ideal_dcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(len(truth), k) + 1))
            totals["ndcg"] += dcg / ideal_dcg
            totals["mrr"] += 1 / hit_ranks[0] if hits else 0.0
        result.update({f"{name}@{k}": total / len(topk_lists) for name, total in totals.items()})
    result["n_cases"] = len(topk_lists)
    return result
