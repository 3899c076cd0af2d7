"""Model hyper-parameters, stored with every checkpoint (to_dict / from_dict are JSON-safe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

# The preprocessing's side-feature order is also the column order of the model's `item_side` buffer.
from pipeline.reading import SIDE_FEATURES

FUSIONS = ("gated", "add", "concat", "multiply")
# Query of the short-term user attention: the paper's profile vector e_u alone, or e_u plus the
# current position's ĥ_t (see sdm/short_term.py for why).
ATTENTION_QUERIES = ("profile", "profile+current")


@dataclass
class ModelConfig:
    n_items: int  # item vocabulary size, padding id 0 included
    n_users: int  # user vocabulary size, padding id 0 included
    side_vocab: dict[str, int] = field(default_factory=dict)  # vocab size of each side feature present
    profile_vocab: list[int] = field(default_factory=list)  # vocab size of each user profile field
    dim: int = 64
    lstm_layers: int = 2
    heads: int = 4
    dropout: float = 0.2
    fusion: Literal["gated", "add", "concat", "multiply"] = "gated"
    attention_query: Literal["profile", "profile+current"] = "profile+current"
    use_long_term: bool = True
    use_short_term: bool = True
    use_side_info: bool = True
    use_user_id: bool = False
    tie_output: bool = False
    # Width of each item feature's embedding table; None = the official code's sizes at dim 64
    # (id 64, shop 32, brand/leaf/category 16), scaled with dim.
    embedding_widths: dict[str, int] | None = None
    profile_width: int | None = None  # width of each profile field's embedding; None = dim // 4 (at least 4)

    def __post_init__(self) -> None:
        unknown = set(self.side_vocab) - set(SIDE_FEATURES)
        if unknown:
            raise ValueError(f"unknown side features {sorted(unknown)}; expected a subset of {SIDE_FEATURES}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.attention_query not in ATTENTION_QUERIES:
            raise ValueError(f"attention_query must be one of {ATTENTION_QUERIES}, got {self.attention_query!r}")
        if not (self.use_long_term or self.use_short_term):
            raise ValueError("at least one of use_long_term / use_short_term must be on")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.lstm_layers < 1:
            raise ValueError("lstm_layers must be >= 1")
        if self.embedding_widths is None:
            half, quarter = max(4, self.dim // 2), max(4, self.dim // 4)
            defaults = {"item": self.dim, "shop": half, "brand": quarter, "leaf": quarter, "category": quarter}
            self.embedding_widths = {f: defaults[f] for f in ("item", *self.side_features)}
        missing = set(self.item_features) - set(self.embedding_widths)
        if missing:
            raise ValueError(f"embedding_widths lacks {sorted(missing)}")
        if self.profile_width is None:
            self.profile_width = max(4, self.dim // 4)

    @property
    def side_features(self) -> tuple[str, ...]:
        """Side features present in the data: the columns of `item_side`, in SIDE_FEATURES order."""
        return tuple(f for f in SIDE_FEATURES if f in self.side_vocab)

    @property
    def item_features(self) -> tuple[str, ...]:
        """Features embedded for an item: its id, plus its side information unless turned off."""
        return ("item", *self.side_features) if self.use_side_info else ("item",)

    @property
    def long_features(self) -> tuple[str, ...]:
        """Long-term behaviour sets: one per item feature, embedded with that feature's table."""
        return self.item_features

    def vocab_size(self, feature: str) -> int:
        return self.n_items if feature == "item" else self.side_vocab[feature]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        # Checkpoints written before the option existed were trained with the paper's query.
        values = {"attention_query": "profile", **values}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}")
        return cls(**values)
