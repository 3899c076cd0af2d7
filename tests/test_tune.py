"""`sdm tune`: an Optuna study on validation that resumes, and a best.toml that `sdm train` reads."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import optuna
import pytest

from helpers.cli import run_sdm, run_sdm_ok


def tune_args(data: Path, out: Path, trials: int) -> list[object]:
    return ["tune", "--data", data, "--out", out, "--trials", trials, "--epochs", 1, "--threads", 1]


def test_tune_writes_the_best_trial_and_train_reads_it(tiny_data, tmp_path):
    out = tmp_path / "study"
    result = run_sdm_ok(*tune_args(tiny_data, out, 2))
    study = optuna.load_study(study_name="sdm", storage=f"sqlite:///{out / 'study.db'}")
    complete = [trial for trial in study.trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and "sdm tune sdm" in result.stdout
    best = max(complete, key=lambda trial: trial.value)
    settings = tomllib.loads((out / "best.toml").read_text())["train"]
    assert settings["model"] == "sdm"
    assert {key.replace("-", "_"): value for key, value in settings.items() if key != "model"} == best.params

    # The trial's own run holds the best validation value the study recorded.
    history = json.loads((out / "trials" / f"{best.number:03d}" / "history.json").read_text())["epochs"]
    assert max(epoch["valid"]["recall@50"] for epoch in history) == pytest.approx(best.value)

    # sdm train --config takes those options; one given on the command line wins.
    run = tmp_path / "run"
    run_sdm_ok("train", "--data", tiny_data, "--out", run, "--epochs", 1, "--config", out / "best.toml", "--dim", 16, "--heads", 2)
    trained = json.loads((run / "config.json").read_text())["train"]
    assert trained["lr"] == best.params["lr"] and trained["weight_decay"] == best.params["weight_decay"]
    assert trained["batch_size"] == best.params["batch_size"] and trained["dim"] == 16


def test_tune_resumes_and_retries_a_cut_off_trial(tiny_data, tmp_path):
    out = tmp_path / "study"
    run_sdm_ok(*tune_args(tiny_data, out, 1))
    study = optuna.load_study(study_name="sdm", storage=f"sqlite:///{out / 'study.db'}")
    cut_off = study.ask()  # as a killed tuner leaves it: RUNNING, with its options drawn
    suggested = {"lr": cut_off.suggest_float("lr", 3e-4, 1e-2, log=True)}
    run_sdm_ok(*tune_args(tiny_data, out, 2))
    trials = optuna.load_study(study_name="sdm", storage=f"sqlite:///{out / 'study.db'}").trials
    states = [trial.state for trial in trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert trials[cut_off.number].state == optuna.trial.TrialState.FAIL
    assert trials[-1].params["lr"] == suggested["lr"]  # tried again first


def test_tune_refuses_models_without_parameters_and_bad_config_files(tiny_data, tmp_path):
    outcome = run_sdm("tune", "--data", tiny_data, "--out", tmp_path / "s", "--model", "popularity")
    assert outcome.exit_code == 2 and "nothing to tune" in outcome.stderr and "Traceback" not in outcome.output
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlearning-rate = 0.1\n')
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "r", "--config", bad)
    assert outcome.exit_code == 2 and "learning-rate" in outcome.stderr and not (tmp_path / "r").exists()
