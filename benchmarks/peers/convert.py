"""Our training sessions as DeepMatch SDM's model input: the same target items, in its format.

Each of our training rows (a session of at most 5 items, the next session's first item, the
session's long-term sets) trains every position: position t predicts item t + 1, the last
position the next session's first item. The peer's sample has one target, so each position
becomes one sample: the session's items up to t as `short_movie_id` (oldest first, padded after,
as its `pad_sequences(padding="post")`), the session's long-term items as `prefer_movie_id` (most
recent first, as its `hist[::-1]`), and `short_genres` / `prefer_genres` the category of each of
those items (the peer keeps genres aligned with the items, sharing their lengths). Both models
then see the same target items, so target items per second compare like with like.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from pipeline.storage import write_atomic

SHORT, PREFER = 5, 50  # the public SDM's MovieLens lengths


def padded(lists: pl.Series, width: int) -> np.ndarray:
    """[N] lists of ids -> [N, width] int32, each list's first `width` ids then zeros."""
    lists = lists.list.head(width)
    lengths = lists.list.len().to_numpy().astype(np.int64)
    out = np.zeros((len(lists), width), dtype=np.int32)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [total] where each id's list begins
    rows = np.repeat(np.arange(len(lists)), lengths)
    out[rows, np.arange(lengths.sum()) - starts] = lists.explode().drop_nulls().to_numpy()
    return out


def position_samples(train: pl.DataFrame, long_term: pl.DataFrame, short_len: int = SHORT) -> pl.DataFrame:
    """One row per trained position: user, target, short (items up to it), prefer (long items).
    Positions whose target is 0 (a user's last training session has no next one) are dropped."""
    return (
        train.with_columns(
            target=pl.concat_list(pl.col("items").list.slice(1), pl.col("next_item")),
            position=pl.int_ranges(0, pl.col("items").list.len(), dtype=pl.UInt32),
        )
        .explode("target", "position")
        .filter(pl.col("target") > 0)
        .join(long_term.select("session", "long_item"), on="session", how="left", maintain_order="left")
        .select(
            "user",
            "target",
            short=pl.col("items").list.head(pl.col("position") + 1).list.tail(short_len),
            prefer=pl.col("long_item").fill_null([]),
        )
    )


def peer_inputs(samples: pl.DataFrame, item_category: np.ndarray, users: pl.DataFrame,
                short_len: int = SHORT, prefer_len: int = PREFER) -> dict[str, np.ndarray]:
    """The columns DeepMatch's SDM reads (gen_model_input_sdm's names), plus vocab_<feature>
    sizes. item_category: [n_items + 1] category of each dense item id (0 for padding).
    users: our users table (user, then one column per profile field)."""
    short, prefer = padded(samples["short"], short_len), padded(samples["prefer"], prefer_len)
    profile = [name for name in users.columns if name != "user"]
    fields = samples.select("user").join(users, on="user", how="left", maintain_order="left").fill_null(0)
    inputs = {
        "user_id": samples["user"].to_numpy().astype(np.int32),
        "movie_id": samples["target"].to_numpy().astype(np.int32),
        "short_movie_id": short,
        "prefer_movie_id": prefer,
        "short_sess_length": samples["short"].list.len().to_numpy().astype(np.int32),
        "prefer_sess_length": np.minimum(samples["prefer"].list.len().to_numpy(), prefer_len).astype(np.int32),
        "short_genres": item_category[short],
        "prefer_genres": item_category[prefer],
        **{name: fields[name].to_numpy().astype(np.int32) for name in profile},
    }
    vocab = {"user_id": users["user"].max(), "movie_id": len(item_category) - 1, "genres": item_category.max(),
             **{name: users[name].max() for name in profile}}
    return inputs | {f"vocab_{name}": np.array(int(size) + 1) for name, size in vocab.items()} | {
        "profile": np.array(",".join(profile))}


def item_categories(items: pl.DataFrame) -> np.ndarray:
    """Our items table (item, category, ...) -> [max item + 1] category per dense id."""
    lookup = np.zeros(int(items["item"].max()) + 1, dtype=np.int32)
    lookup[items["item"].to_numpy()] = items["category"].to_numpy()
    return lookup


def table(path: Path) -> pl.DataFrame:
    """A stage table: one Parquet file, or a directory of part files (user buckets)."""
    return pl.read_parquet(path / "*.parquet" if path.is_dir() else path)


def write_peer_inputs(data: Path, out: Path) -> int:
    """Convert `sdm preprocess` output DATA into the peer's inputs as one .npz; return samples."""
    samples = position_samples(table(data / "splits" / "train.parquet"), table(data / "long_term" / "long_term.parquet"))
    inputs = peer_inputs(samples, item_categories(table(data / "events" / "items.parquet")),
                         table(data / "events" / "users.parquet"))
    write_atomic(out, lambda handle: np.savez(handle, **inputs))
    return len(samples)
