"""SDM learns what the sample data plants.

`sdm synth` plants short-term structure (a session follows one intent, later clicks follow earlier
ones) and long-term structure (users keep favourite categories, brands, shops and considered items
for weeks; sessions often open on an unrelated trending item). With a fixed seed, on the test
split of the shipped sample data (the demo's split), the full SDM must rank above `popularity`
and above SDM without its long-term or its short-term encoder.

Not asserted, because it does not hold on this data yet: SDM above `youtube-dnn` (SDM is ahead
on validation recall@50 but behind on test by about 0.015).
"""

from __future__ import annotations


import pytest

from cli.app import DEMO_TEST_DAYS, DEMO_VALID_DAYS, SAMPLE_DIR
from pipeline.config import PreprocessConfig
from pipeline.run import run_preprocess
from sdm.evaluate import evaluate_split
from sdm.train import TrainConfig, load_trained, train

EPOCHS = 25
METRIC = "recall@50"
SETTINGS = {"dim": 32, "seed": 0}  # the same for every model; d = 32 suits a 2.7k-item catalogue
VARIANTS = {
    "sdm": {},
    "popularity": {"model": "popularity"},
    "no-long-term": {"long_term": False},
    "no-short-term": {"short_term": False},
}


@pytest.fixture(scope="module")
def test_metric(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    root = tmp_path_factory.mktemp("quality")
    data = root / "data"
    run_preprocess(
        PreprocessConfig(
            logs=SAMPLE_DIR / "events.csv", items=SAMPLE_DIR / "items.csv", users=SAMPLE_DIR / "users.csv",
            out=data, test_days=DEMO_TEST_DAYS, valid_days=DEMO_VALID_DAYS,
        )
    )
    results = {}
    for name, options in VARIANTS.items():
        run = root / name
        train(TrainConfig(data=str(data), out=str(run), epochs=EPOCHS, **SETTINGS, **options))
        model, _, catalogue = load_trained(run)
        results[name] = evaluate_split(model, data, catalogue, "test", [50])[METRIC]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("other", [name for name in VARIANTS if name != "sdm"])
def test_sdm_beats(test_metric: dict[str, float], other: str) -> None:
    assert test_metric["sdm"] > test_metric[other], test_metric
