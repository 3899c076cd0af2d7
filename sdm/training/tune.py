"""`sdm tune`: an Optuna search over the training options that matter, on the validation split.

Every model gets the same search space and the same number of trials, so a comparison after tuning
is a comparison of models, not of tuning effort. The study lives in OUT/study.db (SQLite): a
second `sdm tune` with the same OUT continues it, and a trial a killed process left running is
marked failed and its options tried again first. A study continues only with what it started
with: the same model, data, search space and every other option. OUT/best.toml holds the best
options under [train], for `sdm train --config OUT/best.toml`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import optuna
from filelock import FileLock, Timeout
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, distribution_to_json

from pipeline.cache import require_stage
from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir, write_bytes_atomic
from sdm.data.sessions import load_catalogue
from sdm.training.train import TrainConfig, auto_batch_size, data_fingerprint, train

STUDY = "study.db"
BEST = "best.toml"
UNTRAINED_MODELS = ("popularity", "item-cf")
BATCH_FACTORS = (0.25, 0.5, 1, 2, 4)  # of the automatic batch size
SIGNATURE = "signature"  # the study's user attribute: what its trials were run with


def search_space(auto_batch: int) -> dict[str, BaseDistribution]:
    """The options searched, the same for every trained model: TrainConfig field -> distribution.
    Batch sizes are multiples of the data's automatic one (`auto_batch_size`), so the defaults'
    own choice is always tried against smaller and larger ones, and a large log is not tried at a
    batch a hundred times smaller than its default."""
    return {
        "lr": FloatDistribution(3e-4, 1e-2, log=True),
        "weight_decay": FloatDistribution(1e-3, 0.3, log=True),
        "dropout": FloatDistribution(0.0, 0.5),
        "batch_size": CategoricalDistribution([int(auto_batch * factor) for factor in BATCH_FACTORS]),
        "dim": CategoricalDistribution([32, 64, 128]),
    }


SEARCHED = tuple(search_space(auto_batch_size(0)))  # the options' names; only the batch choices depend on the data


def trial_dir(out: Path, number: int) -> Path:
    """Where trial `number` of the study in `out` trains."""
    return out / "trials" / f"{number:03d}"


def suggest_options(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    def draw(name: str, distribution: BaseDistribution) -> Any:
        if isinstance(distribution, CategoricalDistribution):
            return trial.suggest_categorical(name, distribution.choices)
        return trial.suggest_float(name, distribution.low, distribution.high, log=distribution.log)

    return {name: draw(name, distribution) for name, distribution in space.items()}


def study_signature(base: TrainConfig, fingerprint: str, space: dict[str, BaseDistribution]) -> dict[str, Any]:
    """What a study's trials depend on: every option but where it writes and its threads (the data
    by its fingerprint, so a moved directory is the same data), and the search space."""
    options = {name: value for name, value in asdict(base).items() if name not in ("data", "out", "threads", *space)}
    signature = {
        "data": fingerprint,
        "options": options,
        "space": {name: json.loads(distribution_to_json(distribution)) for name, distribution in space.items()},
    }
    return json.loads(json.dumps(signature))  # as the study stores it: tuples become lists


def open_study(out: Path, model: str) -> optuna.Study:
    """OUT's study of `model`, new or to continue; a study of another model there is refused, as
    both would number their trials from 0 in OUT/trials."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{out / STUDY}")
    others = [name for name in optuna.get_all_study_names(storage) if name != model]
    if others:
        raise InputError(f"{out}: holds the study of --model {others[0]}; tune each model in its own --out")
    return optuna.create_study(study_name=model, storage=storage, direction="maximize", load_if_exists=True)


def check_same_study(out: Path, study: optuna.Study, signature: dict[str, Any]) -> None:
    """A study continues only with what it started with: trials of other data, options or search
    space would be ranked against each other as if they were one search."""
    saved = study.user_attrs.get(SIGNATURE)
    if saved is None and study.trials:
        raise InputError(f"{out}: a study of an earlier sdm tune, with another search space; tune in a new --out")
    if saved is not None and saved != signature:
        differing = ["other --data"] if saved["data"] != signature["data"] else []
        differing += [
            f"--{name.replace('_', '-')} {saved['options'].get(name)} (not {value})"
            for name, value in signature["options"].items()
            if saved["options"].get(name) != value
        ]
        # The batch sizes searched follow the data; with the same data, the space changed with sdm.
        differing = differing or ["another search space (the study is from another sdm version)"]
        raise InputError(
            f"{out}: this study began with {', '.join(differing)}; continue it with those options or tune in a new --out"
        )
    if saved is None:
        study.set_user_attr(SIGNATURE, signature)


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
    fingerprint = data_fingerprint(Path(base.data))
    load_catalogue(Path(base.data))
    space = search_space(auto_batch_size(require_stage(Path(base.data), "splits")["stats"]["train_sessions"]))
    ensure_output_dir(out)
    lock = FileLock(out / ".tune.lock", timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(f"{out}: another sdm tune is running on it; wait for it or choose another --out") from None
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = open_study(out, base.model)
        check_same_study(out, study, study_signature(base, fingerprint, space))
        retry_abandoned_trials(study)
        # Optuna does not store the sampler's state: seeded as the first run's, a resumed study's
        # sampler would draw that run's options again. Seeded past the trials the study holds, an
        # uninterrupted study stays the same and a resumed one draws new options.
        study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials))
        finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

        def objective(trial: optuna.Trial) -> float:
            run = trial_dir(out, trial.number)
            shutil.rmtree(run, ignore_errors=True)  # a cut-off attempt of this trial number
            history = train_trial(replace(base, out=str(run), **suggest_options(trial, space)))
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
