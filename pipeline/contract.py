"""The data contract: what `sdm preprocess` writes into its output directory (DATA) and what the
trainer, the server, the reports and `sdm inspect` read from it.

One place for the stage directories, the table files and their fixed columns, so that the side
that writes them and the sides that read them cannot drift apart. Each stage directory is
complete, with its manifest.json, or absent:

    DATA/events/     events.parquet items.parquet users.parquet vocab/<feature>.parquet
    DATA/sessions/   events.parquet (the events with session and position) sessions.parquet
    DATA/long_term/  long_term.parquet (one list column per item feature)
    DATA/splits/     train.parquet valid.parquet test.parquet
    DATA/tensors/    the training split as memory-mapped arrays (written by the first `sdm train`)

With N > 1 user buckets, events.parquet and every table of the last three stages is a directory of
part files, read as one table by the same path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

# Item side features, in the order of the model's `item_side` columns and the long-term sets.
SIDE_FEATURES = ("leaf", "category", "shop", "brand")
ITEM_FEATURES = ("item", *SIDE_FEATURES)
SPLITS = ("train", "valid", "test")
# Each stage directory and the tables (<name>.parquet) it holds, in build order.
STAGE_TABLES = {"events": ("events", "items", "users"), "sessions": ("events", "sessions"), "long_term": ("long_term",),
                "splits": SPLITS}
STAGES = tuple(STAGE_TABLES)

# Fixed columns of each table; the tables may hold more (side features, profile fields, behaviour).
VOCABULARY_SCHEMA = {"id": pl.UInt32, "raw": pl.String, "count": pl.UInt32}
SESSION_EVENTS_SCHEMA = {"user": pl.UInt32, "item": pl.UInt32, "time": pl.Int64, "order": pl.UInt32, "session": pl.UInt32,
                         "position": pl.UInt32}
SESSIONS_SCHEMA = {"session": pl.UInt32, "user": pl.UInt32, "start": pl.Int64, "end": pl.Int64, "length": pl.UInt32,
                   "first_order": pl.UInt32, "items": pl.List(pl.UInt32)}
TRAIN_SCHEMA = {"session": pl.UInt32, "user": pl.UInt32, "items": pl.List(pl.UInt32), "next_item": pl.UInt32}
CASES_SCHEMA = {"user": pl.UInt32, "session": pl.UInt32, "items": pl.List(pl.UInt32), "targets": pl.List(pl.UInt32),
                "first_target_order": pl.UInt32}


def long_term_column(feature: str) -> str:
    """The long-term set of `feature` in long_term.parquet."""
    return f"long_{feature}"


def long_term_schema(features: tuple[str, ...]) -> dict[str, pl.DataType]:
    return {"session": pl.UInt32, **{long_term_column(f): pl.List(pl.UInt32) for f in features}}


@dataclass(frozen=True)
class DataDir:
    """The paths of one DATA directory's tables."""

    root: Path

    def stage(self, name: str) -> Path:
        return self.root / name

    def table(self, stage: str, name: str) -> Path:
        """A table of STAGE_TABLES: a file, or with several buckets a directory of part files."""
        return self.root / stage / f"{name}.parquet"

    def vocabulary(self, name: str) -> Path:
        """The id <-> raw value table of a feature (item, user, a side feature, `profile.<field>`)."""
        return self.root / "events" / "vocab" / f"{name}.parquet"

    def profile_vocabulary(self, field: str) -> Path:
        return self.vocabulary(f"profile.{field}")

    @property
    def items(self) -> Path:
        """One row per item id: its side features."""
        return self.table("events", "items")

    @property
    def users(self) -> Path:
        """One row per user id: its profile fields."""
        return self.table("events", "users")

    @property
    def session_events(self) -> Path:
        return self.table("sessions", "events")

    @property
    def sessions(self) -> Path:
        return self.table("sessions", "sessions")

    @property
    def long_term(self) -> Path:
        return self.table("long_term", "long_term")

    def split(self, name: str) -> Path:
        return self.table("splits", name)

    @property
    def tensors(self) -> Path:
        return self.root / "tensors"
