"""Model hyper-parameters, stored with every checkpoint (to_dict / from_dict are JSON-safe)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from pipeline.contract import SIDE_FEATURES
from pipeline.errors import InputError

FUSIONS = ("gated", "add", "concat", "multiply")
# Query of the short-term user attention: the paper's profile vector e_u alone, or e_u plus the
# current position's ĥ_t (see sdm/models/short_term.py for why).
ATTENTION_QUERIES = ("profile", "profile+current")


# Beyond these a model does not fit in memory (or takes ages to build): a typo, refused before it is tried.
MAX_DIM, MAX_LAYERS = 4096, 64


@dataclass(kw_only=True)
class ModelOptions:
    """The model's options a user chooses, with their defaults: `sdm train`'s model options (its
    TrainConfig extends this class) and the hyper-parameter part of every ModelConfig."""

    dim: int = 64
    lstm_layers: int = 2
    heads: int = 4
    dropout: float = 0.2
    fusion: Literal["gated", "add", "concat", "multiply"] = "gated"
    attention_query: Literal["profile", "profile+current"] = "profile+current"
    long_term: bool = True
    short_term: bool = True
    side_info: bool = True
    user_id: bool = False
    tie_output: bool = True  # score items with their input embedding rather than a separate matrix V

    def __post_init__(self) -> None:
        checks = [
            (self.dim >= 1 and self.heads >= 1 and self.lstm_layers >= 1, "--dim, --heads and --lstm-layers must be at least 1"),
            (self.dim <= MAX_DIM and self.lstm_layers <= MAX_LAYERS, f"--dim must be at most {MAX_DIM} and --lstm-layers at most {MAX_LAYERS}"),
            (self.dim % max(self.heads, 1) == 0, f"--dim {self.dim} must be divisible by --heads {self.heads}"),
            (0 <= self.dropout < 1, f"--dropout {self.dropout}: expected a probability in [0, 1)"),
            (self.fusion in FUSIONS, f"--fusion {self.fusion!r}: expected one of {', '.join(FUSIONS)}"),
            (self.attention_query in ATTENTION_QUERIES,
             f"--attention-query {self.attention_query!r}: expected one of {', '.join(ATTENTION_QUERIES)}"),
            (self.long_term or self.short_term, "--no-long-term and --no-short-term together leave nothing to model"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


# Names the options had in checkpoints written before ModelOptions.
LEGACY_NAMES = {"use_long_term": "long_term", "use_short_term": "short_term", "use_side_info": "side_info", "use_user_id": "user_id"}


@dataclass(kw_only=True)
class ModelConfig(ModelOptions):
    """Everything a model is built from: the options, and the vocabularies the data gives."""

    n_items: int  # item vocabulary size, padding id 0 included
    n_users: int  # user vocabulary size, padding id 0 included
    side_vocab: dict[str, int] = field(default_factory=dict)  # vocab size of each side feature present
    profile_vocab: list[int] = field(default_factory=list)  # vocab size of each user profile field
    # Width of each item feature's embedding table; None = the official code's sizes at dim 64
    # (id 64, shop 32, brand/leaf/category 16), scaled with dim.
    embedding_widths: dict[str, int] | None = None
    profile_width: int | None = None  # width of each profile field's embedding; None = dim // 4 (at least 4)

    def __post_init__(self) -> None:
        super().__post_init__()
        unknown = set(self.side_vocab) - set(SIDE_FEATURES)
        if unknown:
            raise ValueError(f"unknown side features {sorted(unknown)}; expected a subset of {SIDE_FEATURES}")
        if self.embedding_widths is None:
            half, quarter = max(4, self.dim // 2), max(4, self.dim // 4)
            defaults = {"item": self.dim, "shop": half, "brand": quarter, "leaf": quarter, "category": quarter}
            self.embedding_widths = {f: defaults[f] for f in ("item", *self.side_features)}
        missing = set(self.item_features) - set(self.embedding_widths)
        if missing:
            raise ValueError(f"embedding_widths lacks {sorted(missing)}")
        if self.profile_width is None:
            self.profile_width = max(4, self.dim // 4)

    @classmethod
    def build(cls, options: ModelOptions, **vocabularies: Any) -> ModelConfig:
        """The config of a model with these options over the data's vocabularies."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(ModelOptions)}, **vocabularies)

    @property
    def side_features(self) -> tuple[str, ...]:
        """Side features present in the data: the columns of `item_side`, in SIDE_FEATURES order."""
        return tuple(f for f in SIDE_FEATURES if f in self.side_vocab)

    @property
    def item_features(self) -> tuple[str, ...]:
        """Features embedded for an item: its id, plus its side information unless turned off."""
        return ("item", *self.side_features) if self.side_info else ("item",)

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
        # Checkpoints written before an option existed were trained as it was then: the paper's
        # query, a separate output matrix unless they say otherwise.
        values = {"attention_query": "profile", "tie_output": False, **{LEGACY_NAMES.get(k, k): v for k, v in values.items()}}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown ModelConfig keys {sorted(unknown)}")
        return cls(**values)
