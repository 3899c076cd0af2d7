"""`sdm tune`: an Optuna search over the training options that matter, on the validation split.

Every model gets the same search space and the same number of trials, so a comparison after tuning
is a comparison of models, not of tuning effort. The study lives in OUT/study.db (SQLite): a
second `sdm tune` with the same OUT continues it, and a trial a killed process left running is
marked failed and its options tried again first. OUT/best.toml holds the best options under
[train], for `sdm train --config OUT/best.toml`.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock, Timeout

from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir, write_bytes_atomic
from sdm.data.sessions import load_catalogue
from sdm.training.train import TrainConfig, data_fingerprint, train

STUDY = "study.db"
BEST = "best.toml"
UNTRAINED_MODELS = ("popularity", "item-cf")


# The search space, the same for every trained model: TrainConfig field -> its draw.
SEARCH_SPACE: dict[str, Callable[[optuna.Trial, str], Any]] = {
    "lr": lambda trial, name: trial.suggest_float(name, 3e-4, 1e-2, log=True),
    "weight_decay": lambda trial, name: trial.suggest_float(name, 1e-3, 0.3, log=True),
    "dropout": lambda trial, name: trial.suggest_float(name, 0.0, 0.5),
    "batch_size": lambda trial, name: trial.suggest_categorical(name, [32, 64, 128, 256]),
    "dim": lambda trial, name: trial.suggest_categorical(name, [32, 64, 128]),
}


def trial_dir(out: Path, number: int) -> Path:
    """Where trial `number` of the study in `out` trains."""
    return out / "trials" / f"{number:03d}"


def suggest_options(trial: optuna.Trial) -> dict[str, Any]:
    return {name: draw(trial, name) for name, draw in SEARCH_SPACE.items()}


def retry_abandoned_trials(study: optuna.Study) -> None:
    """Trials still RUNNING when no tuner holds the lock were cut off: fail them, try them again."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)


def best_toml(model: str, options: dict[str, Any], value: float, metric: str) -> str:
    lines = [f"# sdm tune: best validation {metric} {value:.4f}", "[train]", f'model = "{model}"']
    lines += [f"{name.replace('_', '-')} = {value!r}" for name, value in sorted(options.items())]
    return "\n".join(lines) + "\n"


def tune(
    base: TrainConfig,
    out: Path,
    trials: int,
    on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
    train_trial: Callable[[TrainConfig], list[dict[str, Any]]] = train,
) -> optuna.Study:
    """Run trials until the study in `out` holds `trials` finished ones; write out/best.toml.
    `base` gives the data, model, epochs and seed; each trial's run goes to out/trials/NNN.
    `train_trial` trains one trial's config and returns its history (tests replace `train`)."""
    if base.model in UNTRAINED_MODELS:
        raise InputError(f"--model {base.model} has nothing to tune (it trains no parameters)")
    if trials < 1:
        raise InputError("--trials must be at least 1")
    # Data a trial would refuse is refused here, as one line, not as a failed trial Optuna logs.
    data_fingerprint(Path(base.data))
    load_catalogue(Path(base.data))
    ensure_output_dir(out)
    lock = FileLock(out / ".tune.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{out}: another sdm tune is running on it; wait for it or choose another --out") from None
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            study_name=base.model,
            storage=f"sqlite:///{out / STUDY}",
            direction="maximize",
            load_if_exists=True,
        )
        retry_abandoned_trials(study)
        # Optuna does not store the sampler's state: seeded as the first run's, a resumed study's
        # sampler would draw that run's options again. Seeded past the trials the study holds, an
        # uninterrupted study stays the same and a resumed one draws new options.
        study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def objective(trial: optuna.Trial) -> float:
            run = trial_dir(out, trial.number)
            shutil.rmtree(run, ignore_errors=True)  # a cut-off attempt of this trial number
            history = train_trial(replace(base, out=str(run), **suggest_options(trial)))
            values = [epoch["valid"].get(base.select_metric, -math.inf) for epoch in history]
            return max(values, default=-math.inf)

        remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
        if remaining > 0:
            callbacks = [lambda _study, trial: on_trial(trial)] if on_trial is not None else []
            study.optimize(objective, n_trials=remaining, callbacks=callbacks)
        best = study.best_trial
        write_bytes_atomic(out / BEST, best_toml(base.model, best.params, best.value, base.select_metric).encode())
        return study
    finally:
        lock.release()
