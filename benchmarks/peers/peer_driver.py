"""Drive DeepMatch 0.3.2's SDM (TensorFlow) for benchmarks/peers/run.py; runs in the peers venv.

    python peer_driver.py preprocess LOG.csv USERS.csv --profile age,gender,city_tier [--events N]
    python peer_driver.py train INPUTS.npz --threads T [--batch-size 512] [--negatives 255] [--dim 32]

Each prints one JSON line with its measurements. Nothing of ours is imported: this file sees only
the venv's TensorFlow, DeepMatch, DeepCTR, pandas and numpy.

`gen_data_set_sdm` and `gen_model_input_sdm` live in DeepMatch's `examples/preprocess.py`, which
the PyPI package does not ship, so `peer_sessions` and `peer_model_input` below restate them:
the same pandas sort and per-user groupby, the same per-position list slices and tuples, the same
shuffle, per-field list comprehensions, `pad_sequences` and `user_profile.loc` lookups, so the
work timed is the example's. Training goes through the package's own API (`SDM`,
`NegativeSampler`, `sampledsoftmaxloss`) as `examples/run_sdm.py` does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

SHORT, PREFER = 5, 50  # the public SDM's MovieLens lengths


def peer_sessions(data, short_len: int = SHORT, prefer_len: int = PREFER) -> tuple[list[tuple], list[tuple]]:
    """The example's gen_data_set_sdm: one sample per position of each user's time-sorted
    history; the last position is the user's test case."""
    data.sort_values("timestamp", inplace=True)
    train_set, test_set = [], []
    for user, history in data.groupby("user_id"):
        items, genres, ratings = history["movie_id"].tolist(), history["genres"].tolist(), history["rating"].tolist()
        for i in range(1, len(items)):
            seen, seen_genres = items[:i], genres[:i]
            n_short = min(i, short_len)
            n_prefer = min(max(i - n_short, 0), prefer_len)
            sample = (
                user, items[i], 1, seen[::-1][:n_short][::-1], seen[::-1][n_short:n_short + n_prefer], n_short,
                n_prefer, seen_genres[::-1][:n_short][::-1], seen_genres[::-1][n_short:n_short + n_prefer], ratings[i],
            )
            (test_set if i == len(items) - 1 else train_set).append(sample)
    random.shuffle(train_set)
    random.shuffle(test_set)
    return train_set, test_set


def peer_model_input(train_set: list[tuple], user_profile, profile: list[str], short_len: int = SHORT,
                     prefer_len: int = PREFER) -> dict:
    """The example's gen_model_input_sdm: columns of the sample tuples, padded with tf.keras."""
    import numpy as np
    from tensorflow.keras.preprocessing.sequence import pad_sequences

    def padded(column: int, length: int):
        return pad_sequences([line[column] for line in train_set], maxlen=length, padding="post", truncating="post", value=0)

    inputs = {
        "user_id": np.array([line[0] for line in train_set]),
        "movie_id": np.array([line[1] for line in train_set]),
        "short_movie_id": padded(3, short_len),
        "prefer_movie_id": padded(4, prefer_len),
        "short_sess_length": np.array([line[5] for line in train_set]),
        "prefer_sess_length": np.array([line[6] for line in train_set]),
        "short_genres": padded(7, short_len),
        "prefer_genres": padded(8, prefer_len),
    }
    for key in profile:
        inputs[key] = user_profile.loc[inputs["user_id"]][key].values
    return inputs


def preprocess(args: argparse.Namespace) -> dict:
    """Time the two example functions on the first `events` rows of the log (read and label
    encoding, which the example does before them, are not timed)."""
    import pandas as pd

    profile = args.profile.split(",")
    data = pd.read_csv(args.log, dtype=str, nrows=args.events or None)
    data = data.rename(columns={"item_id": "movie_id", "category": "genres"})
    data["timestamp"] = data["timestamp"].astype("int64")
    data["rating"] = 1  # the example carries a rating through; the log has none
    users = pd.read_csv(args.users, dtype=str)
    data = data.merge(users, on="user_id", how="left").fillna("")
    for feature in ["user_id", "movie_id", "genres", *profile]:  # the example's LabelEncoder + 1
        data[feature] = pd.factorize(data[feature], sort=True)[0] + 1
    user_profile = data[["user_id", *profile]].drop_duplicates("user_id").set_index("user_id")

    started = time.perf_counter()
    train_set, test_set = peer_sessions(data)
    sessions_seconds = time.perf_counter() - started
    inputs = peer_model_input(train_set, user_profile, profile)
    peer_model_input(test_set, user_profile, profile)
    seconds = time.perf_counter() - started
    return {"events": len(data), "samples": len(inputs["movie_id"]), "seconds": seconds,
            "gen_data_set_seconds": sessions_seconds, "events_per_second": len(data) / seconds}


class BatchClock:
    """A Keras callback keeping the end time of every training batch."""

    def __init__(self):
        from tensorflow.keras.callbacks import Callback

        clock = self

        class _Callback(Callback):
            def on_train_batch_end(self, batch, logs=None):
                clock.ends.append(time.perf_counter())

        self.ends: list[float] = []
        self.callback = _Callback()


def build_model(inputs: dict, dim: int, negatives: int, profile: list[str]):
    """SDM as examples/run_sdm.py builds it, at `dim` with `negatives` frequency-sampled negatives."""
    from collections import Counter

    from deepctr.feature_column import SparseFeat, VarLenSparseFeat
    from deepmatch.models import SDM
    from deepmatch.utils import NegativeSampler

    size = {name: int(inputs[f"vocab_{name}"]) for name in ["user_id", "movie_id", "genres", *profile]}

    def history(prefix: str, feature: str, length: int):
        return VarLenSparseFeat(SparseFeat(f"{prefix}_{feature}", size[feature], dim, embedding_name=feature), length,
                                "mean", f"{prefix}_sess_length")

    user_columns = [SparseFeat(name, size[name], 16) for name in ["user_id", *profile]] + [
        history("short", "movie_id", SHORT), history("prefer", "movie_id", PREFER),
        history("short", "genres", SHORT), history("prefer", "genres", PREFER),
    ]
    item_columns = [SparseFeat("movie_id", size["movie_id"], dim)]
    counts = Counter(inputs["movie_id"].tolist())
    sampler = NegativeSampler("frequency", num_sampled=negatives, item_name="movie_id",
                              item_count=[counts.get(i, 0) for i in range(size["movie_id"])])
    return SDM(user_columns, item_columns, history_feature_list=["movie_id", "genres"], units=dim,
               sampler_config=sampler)


def train(args: argparse.Namespace) -> dict:
    """One epoch of model.fit; items/s counted from the end of batch `warmup_batches` (graph
    building and the first steps excluded) to the end of the epoch."""
    import numpy as np
    import tensorflow as tf
    from deepmatch.utils import sampledsoftmaxloss

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.compat.v1.disable_eager_execution()  # as run_sdm.py does on TF 2
    tf.random.set_seed(args.seed)
    np.random.seed(args.seed)

    stored = np.load(args.inputs)
    profile = str(stored["profile"]).split(",")
    inputs = {name: stored[name] for name in stored.files if not name.startswith("vocab_") and name != "profile"}
    if args.limit:
        inputs = {name: column[:args.limit] for name, column in inputs.items()}
    inputs.update({name: stored[name] for name in stored.files if name.startswith("vocab_")})
    model = build_model(inputs, args.dim, args.negatives, profile)
    model.compile(optimizer="adam", loss=sampledsoftmaxloss)
    features = {name: inputs[name] for name in model.input_names}
    n = len(inputs["movie_id"])

    clock = BatchClock()
    started = time.perf_counter()
    model.fit(features, np.ones(n), batch_size=args.batch_size, epochs=1, verbose=0, callbacks=[clock.callback])
    fit_seconds = time.perf_counter() - started
    warm = args.warmup_batches
    measured = n - (warm + 1) * args.batch_size  # samples after the end of batch `warm`
    seconds = clock.ends[-1] - clock.ends[warm]
    return {"samples": n, "batches": len(clock.ends), "measured_samples": measured, "seconds": seconds,
            "fit_seconds": fit_seconds, "items_per_second": measured / seconds, "threads": args.threads,
            "versions": {"tensorflow": tf.__version__, **package_versions()}}


def package_versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ["deepmatch", "deepctr", "numpy", "pandas"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pre = commands.add_parser("preprocess")
    pre.add_argument("log")
    pre.add_argument("users")
    pre.add_argument("--profile", required=True)
    pre.add_argument("--events", type=int, default=0)
    tr = commands.add_parser("train")
    tr.add_argument("inputs")
    tr.add_argument("--threads", type=int, required=True)
    tr.add_argument("--batch-size", type=int, default=512)
    tr.add_argument("--negatives", type=int, default=255)
    tr.add_argument("--dim", type=int, default=32)
    tr.add_argument("--warmup-batches", type=int, default=20)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--limit", type=int, default=0, help="train on the first N samples only (0: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = preprocess(args) if args.command == "preprocess" else train(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
