"""Parameters of `sdm preprocess`, grouped by the stage they affect.

A stage is rerun when its own parameters or anything upstream changed, so every field belongs
to exactly one stage (see `STAGE_FIELDS`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pipeline.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DURATION_UNITS_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
SPLITS = ("temporal", "leave-last-out")
SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# A period in days, converted to milliseconds in int64: anything longer than a few centuries is a typo
# (and 1e300 days would overflow).
MAX_DAYS = 100_000
# Counts and durations become polars Int64 values, added to others: a count beyond 2^31 - 1 or a
# duration or size beyond 2^62 is a typo, not a setting, and would overflow (max-long 2^63 did).
LARGEST = {"min_item_count": 2**31 - 1, "max_user_events": 2**31 - 1, "max_session_length": 2**31 - 1, "max_long": 2**31 - 1,
           "session_gap_ms": 2**62, "long_window_ms": 2**62, "memory_limit": 2**62}
# Each bucket is a job of its own with its own part files: more than this is a typo too (and
# planning 1e30 buckets would never end).
MAX_BUCKETS = 10_000
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
    items_columns: tuple[str, ...] | None = None  # names for a headerless --items file
    users_columns: tuple[str, ...] | None = None  # names for a headerless --users file
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
            (all(0 < days <= MAX_DAYS for days in (self.test_days, self.valid_days)),
             f"--test-days and --valid-days must be positive numbers of days, at most {MAX_DAYS:,}"),
            (0 < self.input_fraction < 1, "--input-fraction must be between 0 and 1"),
            (
                self.flag_columns is None or not {"category", "leaf"} & set(self.column_map),
                "--flag-columns fills category and leaf; drop --column category=/leaf=",
            ),
            (self.items is not None or self.items_columns is None, "--items-columns names the columns of --items; add --items FILE"),
            (self.users is not None or self.users_columns is None, "--users-columns names the columns of --users; add --users FILE"),
            (self.memory_limit >= 10**8, "--memory-limit must be at least 100MB"),
            (self.buckets is None or 1 <= self.buckets <= MAX_BUCKETS, f"--buckets must be from 1 to {MAX_BUCKETS:,}"),
        ]
        checks += [
            (getattr(self, name) is None or getattr(self, name) <= largest,
             f"--{name.removesuffix('_ms').replace('_', '-')} must be at most {largest:,}{' ms' * name.endswith('_ms')}")
            for name, largest in LARGEST.items()
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def stage_params(self, stage: str) -> dict[str, Any]:
        """The JSON-safe parameters that decide whether `stage` must be rebuilt. An option added
        since data was first built enters only when it is set: data built before it stays current,
        and so do the runs trained on that data (they name it by its manifests' digests)."""
        values = asdict(self)
        return {name: _json_safe(values[name]) for name in STAGE_FIELDS[stage]
                if not (name in ADDED_OPTIONS and values[name] is None)}


def _json_safe(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


ADDED_OPTIONS = ("items_columns", "users_columns")  # after 0.2.0 (see stage_params)
STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    "events": ("sep", "header", "columns", "items_columns", "users_columns", "column_map", "time_format", "flag_columns",
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


# --- config files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettingKind:
    """What a setting of a TOML config file must hold: `expected` is said in the message when not."""

    expected: str
    accepts: Callable[[Any], bool]


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # TOML's true is no count


INTEGER = SettingKind("an integer", _is_integer)
NUMBER = SettingKind("a finite number", lambda value: (_is_integer(value) or isinstance(value, float)) and math.isfinite(value))
TEXT = SettingKind("a string", lambda value: isinstance(value, str))
BOOLEAN = SettingKind("true or false", lambda value: isinstance(value, bool))
DURATION = SettingKind('a duration string, e.g. "10m"', lambda value: isinstance(value, str))
DURATION_OR_NONE = SettingKind('a duration string, e.g. "7d", or "none"', lambda value: isinstance(value, str))
SIZE = SettingKind('a size string, e.g. "4GB"', lambda value: isinstance(value, str))
NAMES = SettingKind('a list of column names or one comma-separated string, e.g. "user,item,time"',
                    lambda value: isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)))
ROLE_TABLE = SettingKind('a table of ROLE = "column name", e.g. column = { user = "uid" }',
                         lambda value: isinstance(value, dict) and all(isinstance(v, str) for v in value.values()))


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file as data (never executed); unreadable or invalid: one line naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputError(f"{path}: cannot read the config file ({error.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: invalid TOML ({error})") from None


def shown(value: Any) -> str:
    """A TOML value as it would be written in the file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # inf, nan, 1e+300
    return json.dumps(value, ensure_ascii=False, default=str)


def read_settings(path: Path, table: Any, section: str, kinds: dict[str, SettingKind]) -> dict[str, Any]:
    """The settings of one [section] of a config file, by option name (`session_gap`): keys may be
    spelled as the option (`session-gap`) or with underscores; an unknown key or a value of the
    wrong type is one line naming the key, the value and what was expected."""
    if not isinstance(table, dict):
        raise InputError(f"{path}: [{section}] must be a table of options, not {shown(table)}")
    unknown = sorted(key for key in table if key.replace("-", "_") not in kinds)
    if unknown:
        valid = ", ".join(sorted(name.replace("_", "-") for name in kinds))
        raise InputError(f"{path}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in [{section}]; valid: {valid}")
    settings = {}
    for key, value in table.items():
        name = key.replace("-", "_")
        if name in settings:
            raise InputError(f"{path}: {key} is set twice in [{section}] (as {name.replace('_', '-')} and {name})")
        if not kinds[name].accepts(value):
            raise InputError(f"{path}: {key} = {shown(value)} in [{section}]: expected {kinds[name].expected}")
        settings[name] = value
    return settings
