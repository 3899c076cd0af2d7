"""The data contract (pipeline/contract.py): what `sdm preprocess` writes is what its readers expect."""

from __future__ import annotations

import subprocess
import sys

import polars as pl

from pipeline.cache import read_manifest
from pipeline.contract import (
    CASES_SCHEMA,
    SESSION_EVENTS_SCHEMA,
    SESSIONS_SCHEMA,
    SIDE_FEATURES,
    SPLITS,
    TRAIN_SCHEMA,
    VOCABULARY_SCHEMA,
    DataDir,
    long_term_schema,
)


def holds(path, schema: dict) -> None:
    written = pl.read_parquet_schema(path)
    assert {name: written.get(name) for name in schema} == schema, (path, written)


def test_every_table_preprocess_writes_holds_the_contract_columns(tiny_data):
    layout = DataDir(tiny_data)
    side_features = tuple(read_manifest(layout.stage("events"))["stats"]["side_features"])
    assert side_features and set(side_features) <= set(SIDE_FEATURES)
    for name in ("item", "user", *side_features):
        holds(layout.vocabulary(name), VOCABULARY_SCHEMA)
    holds(layout.items, {"item": pl.UInt32, **dict.fromkeys(side_features, pl.UInt32)})
    holds(layout.session_events, SESSION_EVENTS_SCHEMA)
    holds(layout.sessions, SESSIONS_SCHEMA)
    holds(layout.long_term, long_term_schema(("item", *side_features)))
    holds(layout.split("train"), TRAIN_SCHEMA)
    for split in SPLITS[1:]:
        holds(layout.split(split), CASES_SCHEMA)


def test_the_pipeline_builds_the_contract_stages_in_order():
    from pipeline.contract import STAGES
    from pipeline.run import PIPELINE

    assert tuple(stage.name for stage in PIPELINE) == STAGES
    built = set()
    for stage in PIPELINE:  # each reads only stages built before it
        assert set(stage.upstream) <= built, stage
        built.add(stage.name)


def test_the_model_does_not_import_the_log_reader():
    # The model and its config need the contract's names, not the CSV reading of preprocessing.
    probe = "import sys, sdm.models.sdm; print(sorted(m for m in sys.modules if m.startswith('pipeline.')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "pipeline.contract" in loaded and "pipeline.reading" not in loaded and "pipeline.events" not in loaded, loaded
