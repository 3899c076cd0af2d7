"""Small models and batches for the model tests: a catalogue of N_ITEMS items with every side
feature, two profile fields, and right-padded sessions of lengths 1..T."""

from __future__ import annotations

import torch

from sdm.models import build_model
from sdm.models.config import ModelConfig

N_ITEMS = 40
SIDE_VOCAB = {"leaf": 9, "category": 4, "shop": 7, "brand": 6}
PROFILE_VOCAB = [5, 3]


def make_config(**overrides) -> ModelConfig:
    values = dict(n_items=N_ITEMS, n_users=20, side_vocab=SIDE_VOCAB, profile_vocab=PROFILE_VOCAB, dim=16, heads=4)
    values.update(overrides)
    return ModelConfig(**values)


def make_item_side(config: ModelConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    columns = [torch.randint(1, config.side_vocab[f], (config.n_items,), generator=g) for f in config.side_features]
    item_side = torch.stack(columns, dim=1) if columns else torch.zeros(config.n_items, 0, dtype=torch.long)
    item_side[0] = 0
    return item_side


def make_batch(config: ModelConfig, B: int = 6, T: int = 5, L: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded sessions of lengths 1..T and long-term sets of random sizes (row 0 empty)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0] = T
    items = torch.randint(1, config.n_items, (B, T), generator=g) * (torch.arange(T) < lengths[:, None])
    batch = {
        "items": items,
        "lengths": lengths,
        "profile": torch.stack([torch.randint(0, v, (B,), generator=g) for v in config.profile_vocab], 1)
        if config.profile_vocab
        else torch.zeros(B, 0, dtype=torch.long),
        "user": torch.randint(1, config.n_users, (B,), generator=g),
    }
    set_sizes = torch.randint(0, L + 1, (B,), generator=g)
    set_sizes[0] = 0
    for f in ("item", *SIDE_VOCAB):
        vocab = config.n_items if f == "item" else SIDE_VOCAB[f]
        batch[f"long_{f}"] = torch.randint(1, vocab, (B, L), generator=g) * (torch.arange(L) < set_sizes[:, None])
    return batch


def make_model(name: str = "sdm", seed: int = 0, **overrides) -> torch.nn.Module:
    config = make_config(**overrides)
    torch.manual_seed(seed)
    counts = torch.arange(config.n_items, 0, -1)
    model = build_model(name, config, make_item_side(config), counts)
    return model.eval()


def pad_right(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    """Append `extra` padding columns to the session and to every long-term set."""
    padded = dict(batch)
    for key, value in batch.items():
        if key == "items" or key.startswith("long_"):
            padded[key] = torch.cat([value, torch.zeros(value.shape[0], extra, dtype=value.dtype)], dim=1)
    return padded


ABLATIONS = [
    {},
    {"fusion": "add"},
    {"fusion": "concat"},
    {"fusion": "multiply"},
    {"attention_query": "profile"},
    {"long_term": False},
    {"short_term": False},
    {"side_info": False},
    {"user_id": True},
    {"tie_output": False},
    {"profile_vocab": []},
    {"side_vocab": {"category": 4}},
    {"lstm_layers": 1, "heads": 1},
]
