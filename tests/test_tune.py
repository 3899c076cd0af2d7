"""`sdm tune`: an Optuna study on validation that resumes, and a best.toml that `sdm train` reads."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import optuna
import pytest

from helpers.cli import run_sdm, run_sdm_ok
from pipeline.errors import InputError
from sdm.data.sessions import load_catalogue, load_training
from sdm.training.train import TrainConfig, auto_batch_size
from sdm.training.tune import tune


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


def fake_trial(seen: list[TrainConfig]):
    """tune's train_trial, training nothing: records the config, reports its learning rate."""

    def train_trial(config: TrainConfig) -> list[dict]:
        seen.append(config)
        return [{"valid": {"recall@50": config.lr}}]

    return train_trial


def test_batch_sizes_searched_surround_the_automatic_one(tiny_data, tmp_path):
    """The defaults' own batch size (from the sessions the trainer loads) is a choice, with
    smaller and larger ones, so tuning can find the defaults again."""
    seen: list[TrainConfig] = []
    study = tune(TrainConfig(data=str(tiny_data), out=str(tmp_path), epochs=1), tmp_path, 6, train_trial=fake_trial(seen))
    automatic = auto_batch_size(len(load_training(tiny_data, load_catalogue(tiny_data))))
    choices = study.trials[0].distributions["batch_size"].choices
    assert automatic in choices and min(choices) < automatic < max(choices)
    assert {config.batch_size for config in seen} <= set(choices)


def test_a_study_continues_only_with_the_options_it_started_with(tiny_data, sample_data, tmp_path):
    out = tmp_path / "study"
    base = TrainConfig(data=str(tiny_data), out=str(out), epochs=1)
    tune(base, out, 2, train_trial=fake_trial([]))

    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)  # the same data elsewhere is the same study
    assert len(tune(replace(base, data=str(moved)), out, 3, train_trial=fake_trial([])).trials) == 3

    refused = [
        ({"epochs": 2}, "--epochs 1 (not 2)"),
        ({"data": str(sample_data)}, "other --data"),
        ({"fusion": "add"}, "--fusion gated (not add)"),
    ]
    for changed, named in refused:
        with pytest.raises(InputError, match=rf"began with {re.escape(named)}; continue it with those options"):
            tune(replace(base, **changed), out, 4, train_trial=fake_trial([]))
    with pytest.raises(InputError, match="holds the study of --model sdm"):
        tune(replace(base, model="gru4rec"), out, 4, train_trial=fake_trial([]))
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == ["sdm"]
    assert len(optuna.load_study(study_name="sdm", storage=f"sqlite:///{out / 'study.db'}").trials) == 3

    # As the CLI reports it: one line, exit code 2.
    outcome = run_sdm(*tune_args(tiny_data, out, 4)[:-2], "--threads", 1, "--seed", 7)
    assert outcome.exit_code == 2 and "began with --seed 0 (not 7)" in outcome.stderr and "Traceback" not in outcome.output


def test_a_study_of_an_earlier_sdm_tune_is_not_continued(tiny_data, tmp_path):
    """Studies from before the signature searched other batch sizes: Optuna cannot mix them."""
    study = optuna.create_study(study_name="sdm", storage=f"sqlite:///{tmp_path / 'study.db'}", direction="maximize")
    trial = study.ask()
    trial.suggest_categorical("batch_size", [32, 64, 128, 256])
    study.tell(trial, 0.1)
    base = TrainConfig(data=str(tiny_data), out=str(tmp_path), epochs=1)
    with pytest.raises(InputError, match="an earlier sdm tune"):
        tune(base, tmp_path, 2, train_trial=fake_trial([]))

    # One with a signature, whose space another sdm version drew: named as such, not as an option.
    later = tmp_path / "later"
    tune(base, later, 1, train_trial=fake_trial([]))
    study = optuna.load_study(study_name="sdm", storage=f"sqlite:///{later / 'study.db'}")
    signature = study.user_attrs["signature"]
    signature["space"]["dim"]["attributes"]["choices"] = [16, 32]
    study.set_user_attr("signature", signature)
    with pytest.raises(InputError, match=r"began with another search space \(the study is from another sdm version\)"):
        tune(base, later, 2, train_trial=fake_trial([]))
