"""The models, each behind the Recommender interface (sdm/models/base.py), and the registry that
builds one by name. SDM is models/sdm.py with its parts (embedding, short_term, long_term, fusion,
attention); the baselines are youtube_dnn, popularity, gru4rec, sasrec and item_cf."""

from __future__ import annotations

from torch import Tensor

from sdm.models.base import Recommender
from sdm.models.config import ModelConfig
from sdm.models.gru4rec import GRU4Rec
from sdm.models.item_cf import ItemCF
from sdm.models.popularity import Popularity
from sdm.models.sasrec import SASRec
from sdm.models.sdm import SDM
from sdm.models.youtube_dnn import YouTubeDNN

MODEL_NAMES = ("sdm", "youtube-dnn", "popularity", "gru4rec", "sasrec", "item-cf")


def build_model(
    name: str, config: ModelConfig, item_side: Tensor, item_counts: Tensor, training_sessions: Tensor | None = None
) -> Recommender:
    """name in MODEL_NAMES; item_side [n_items, S] side-feature ids, item_counts [n_items] training counts,
    training_sessions [N, T] training session items, which item-cf computes its similarities from
    (without them its tables stay empty, ready for load_state_dict)."""
    if name == "sdm":
        return SDM(config, item_side)
    if name == "youtube-dnn":
        return YouTubeDNN(config, item_side)
    if name == "popularity":
        return Popularity(item_counts)
    if name == "gru4rec":
        return GRU4Rec(config, item_side)
    if name == "sasrec":
        return SASRec(config, item_side)
    if name == "item-cf":
        return ItemCF(config, training_sessions)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
