"""Parameters of `sdm preprocess`, grouped by the stage they affect.

A stage is rerun when its own parameters or anything upstream changed, so every field belongs
to exactly one stage (see `STAGE_FIELDS`).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import InputError

DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
SPLITS = ("temporal", "leave-last-out")
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# A fixed default rather than a share of this machine's RAM: the same command then picks the same
# number of buckets (the same file layout, the same caches) on every machine, and 2 GB is safe on
# any laptop.
DEFAULT_MEMORY_LIMIT = 2 * 10**9


def parse_duration(text: str | int | None, *, option: str, allow_none: bool = False) -> int | None:
    """'10m', '600s', '7d', '1h30m' -> milliseconds; 'none' -> None where allowed."""
    if text is None:
        return None
    if isinstance(text, int):
        return text
    value = text.strip().lower()
    if allow_none and value in ("none", "unlimited", "inf"):
        return None
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", value)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", "", value).strip():
        accepted = "e.g. 90s, 10m, 2h, 7d" + (" or none" if allow_none else "")
        raise InputError(f"{option}: cannot read duration {text!r} ({accepted})")
    return round(sum(float(number) * DURATION_UNITS_MS[unit] for number, unit in parts))


def parse_size(text: str | int, *, option: str) -> int:
    """'4GB', '512MiB', '2.5gb' or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", text.lower())
    if not match:
        raise InputError(f"{option}: cannot read size {text!r} (e.g. 4GB, 512MB, 8GiB)")
    return round(float(match.group(1)) * SIZE_UNITS[match.group(2) or "b"])


@dataclass(frozen=True)
class PreprocessConfig:
    logs: Path
    out: Path
    items: Path | None = None
    users: Path | None = None
    # reading (stage "events")
    sep: str | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    column_map: dict[str, str] = field(default_factory=dict)
    time_format: str | None = None
    flag_columns: str | None = None  # one-hot flag columns -> category and leaf, see pipeline/flags.py
    min_item_count: int = 5
    max_user_events: int | None = None
    keep_duplicates: bool = False
    strict: bool = False
    # stage "sessions"
    session_gap_ms: int = 10 * 60_000
    max_session_length: int = 50
    # stage "long_term"
    long_window_ms: int | None = 7 * 86_400_000
    max_long: int = 20
    # stage "splits"
    split: Literal["temporal", "leave-last-out"] = "temporal"
    test_days: float = 1.0
    valid_days: float = 1.0
    input_fraction: float = 0.25
    # layout: how many user buckets the per-user stages are built in (see pipeline/buckets.py)
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    buckets: int | None = None  # None: picked from memory_limit

    def __post_init__(self) -> None:
        checks = [
            (self.min_item_count >= 1, "--min-item-count must be at least 1"),
            (self.max_user_events is None or self.max_user_events >= 1, "--max-user-events must be at least 1"),
            (self.session_gap_ms > 0, "--session-gap must be positive"),
            (self.max_session_length >= 2, "--max-session-length must be at least 2"),
            (self.long_window_ms is None or self.long_window_ms > 0, "--long-window must be positive or none"),
            (self.max_long >= 1, "--max-long must be at least 1"),
            (self.split in SPLITS, f"--split must be one of {', '.join(SPLITS)}"),
            (self.test_days > 0 and self.valid_days > 0, "--test-days and --valid-days must be positive"),
            (0 < self.input_fraction < 1, "--input-fraction must be between 0 and 1"),
            (
                self.flag_columns is None or not {"category", "leaf"} & set(self.column_map),
                "--flag-columns fills category and leaf; drop --column category=/leaf=",
            ),
            (self.memory_limit >= 10**8, "--memory-limit must be at least 100MB"),
            (self.buckets is None or self.buckets >= 1, "--buckets must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The JSON-safe parameters that decide whether `stage` must be rebuilt."""
        values = asdict(self)
        return {name: _json_safe(values[name]) for name in STAGE_FIELDS[stage]}


def _json_safe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "events": ("sep", "header", "columns", "column_map", "time_format", "flag_columns",
               "min_item_count", "max_user_events", "keep_duplicates", "strict"),
    "sessions": ("session_gap_ms", "max_session_length"),
    "long_term": ("long_window_ms", "max_long"),
    "splits": ("split", "test_days", "valid_days", "input_fraction"),
    # Not a stage: these only choose the number of buckets, which changes the file layout but not
    # one value of the output. The number itself (not the limit) enters the events fingerprint,
    # and so, through the manifest digests, every later stage's.
    "layout": ("memory_limit", "buckets"),
}
assert set().union(*STAGE_FIELDS.values()) == {
    f.name for f in fields(PreprocessConfig) if f.name not in ("logs", "out", "items", "users")
}
