"""`sdm train`: fit a model on the training split, select the epoch on the validation split.

Every position of a training session is trained in one pass (causal masks), as in the paper's
official code: position t predicts the item at t + 1, and the last position the first item of
the user's next session.

Under `torchrun` (or `sdm train --nproc N`) the ranks train one model with DDP. Every rank plans
the same global batches of batch_size x world_size sessions and takes its share of each; the loss
of a step is the sum over every rank's targets divided by their total, with the same negatives on
every rank (a shared generator), so a step is the step one process takes on the whole global
batch. Each rank evaluates a share of the validation cases and the metric sums are added up; rank
0 alone writes the run directory.

    torchrun --nproc-per-node 2 -m sdm train --data DATA --out RUN [sdm train's options]
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.cache import manifest_digest, require_stage
from pipeline.diagnostics import NO_REPEATS_SHARE
from pipeline.errors import InputError
from pipeline.storage import ensure_output_dir
from sdm.models import MODEL_NAMES, build_model
from sdm.training.checkpoint import (
    BEST,
    CONFIG,
    HISTORY,
    LAST,
    check_same_run,
    interrupts_deferred,
    load_checkpoint,
    read_run_config,
    restore,
    run_lock,
    same_options,
    save_checkpoint,
    write_run_json,
)
from sdm.models.config import ModelConfig, ModelOptions
from sdm.data.sessions import (
    Catalogue,
    SessionData,
    length_grouped_batches,
    load_cases,
    load_catalogue,
    load_training,
    seen_items,
    to_device,
    training_repeat_share,
)
from sdm.training.distributed import DEVICES, Ranks, join, leave
from sdm.evaluation.evaluate import evaluate_shared
from sdm.training.losses import LogUniformSampler, alone, full_softmax_loss, in_batch_softmax_loss, sampled_softmax_loss
from sdm.evaluation.metrics import KS, METRICS
from sdm.models.base import Recommender

# Buffers (the item side table) never change: broadcasting them every step would only cost. Newer
# PyTorch renamed the option (and deprecated the old name).
NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)
FULL_SOFTMAX_MAX_ITEMS = 20_000  # --loss auto uses the exact softmax up to this catalogue size
LOSSES = ("auto", "sampled", "full")
NEGATIVES = ("log-uniform", "in-batch")
LONG_TERM_MODELS = ("sdm", "youtube-dnn", "item-cf")  # the models that read the long-term sets
MAX_THREADS, MAX_NEGATIVES = 1024, 10**7


@dataclass(kw_only=True)
class TrainConfig(ModelOptions):
    """`sdm train`'s options: the model's (ModelOptions) and the training's."""

    data: str
    out: str
    model: str = "sdm"
    epochs: int = 20
    batch_size: int = 0  # sessions per step and process; 0 = auto_batch_size(training sessions)
    lr: float = 3e-3  # the peak rate, after warm-up
    weight_decay: float = 0.1  # decoupled (AdamW)
    warmup: float = 0.05  # share of the planned steps with a linear warm-up; cosine decay to 0 after
    clip_norm: float = 5.0
    loss: str = "auto"
    negatives: str = "log-uniform"
    num_negatives: int = 1000
    patience: int = 5
    select_metric: str = "recall@50"
    ks: list[int] = field(default_factory=lambda: list(KS))
    seed: int = 0
    threads: int = 0  # per process; 0 = PyTorch's default (every core, or OMP_NUM_THREADS)
    device: str = "auto"  # auto = CUDA when PyTorch sees a GPU
    bf16: bool = False  # bfloat16 autocast of forward and loss
    # Rank without the items each user already had (validation here; `sdm evaluate`, `sdm recommend`
    # and `sdm serve` follow the run). None = when no user returns to an item in the training sessions.
    exclude_seen: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.model in MODEL_NAMES, f"--model must be one of {', '.join(MODEL_NAMES)}"),
            (self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}"),
            (self.negatives in NEGATIVES, f"--negatives must be one of {', '.join(NEGATIVES)}"),
            (self.epochs >= 0 and self.lr > 0, "--epochs and --lr must be positive"),
            (self.batch_size >= 0, "--batch-size must be positive (or 0 for automatic)"),
            (self.weight_decay >= 0, "--weight-decay must not be negative"),
            (0 <= self.warmup < 1, "--warmup must be a share of the steps in [0, 1)"),
            (self.num_negatives >= 1, "--num-negatives must be at least 1"),
            (self.patience >= 1, "--patience must be at least 1"),
            (self.select_metric.partition("@")[0] in METRICS and self.select_metric.partition("@")[2].isdigit()
             and int(self.select_metric.partition("@")[2]) >= 1,
             f"--select-metric {self.select_metric!r}: expected one of {', '.join(METRICS)} at a K >= 1, e.g. recall@50"),
            # Beyond these a run does not fit in memory (or takes ages to start): a typo, refused before it is tried.
            (self.seed < 2**63 and self.threads <= MAX_THREADS and self.num_negatives <= MAX_NEGATIVES,
             f"--seed must be below 2^63, --threads at most {MAX_THREADS} and --num-negatives at most {MAX_NEGATIVES:,}"),
            (self.seed >= 0 and self.threads >= 0, "--seed and --threads must not be negative"),
            (math.isfinite(self.lr) and math.isfinite(self.weight_decay), "--lr and --weight-decay must be finite numbers"),
            (self.clip_norm > 0 and math.isfinite(self.clip_norm), f"--clip-norm {self.clip_norm}: expected a positive number"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            # Options a model would silently ignore: refusing them keeps an "ablation" from being a rerun.
            (self.fusion == "gated" or self.model == "sdm", f"--fusion applies to --model sdm only, not {self.model}"),
            (self.short_term or self.model == "sdm", f"--no-short-term applies to --model sdm only, not {self.model}"),
            (self.attention_query == "profile+current" or self.model == "sdm",
             f"--attention-query applies to --model sdm only, not {self.model}"),
            (self.long_term or self.model in LONG_TERM_MODELS,
             f"--no-long-term applies to --model {', '.join(LONG_TERM_MODELS)} only, not {self.model}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if int(self.select_metric.partition("@")[2]) not in self.ks:
            self.ks = sorted({*self.ks, int(self.select_metric.partition("@")[2])})

    def model_config(self, catalogue: Catalogue) -> ModelConfig:
        return ModelConfig.build(
            self, n_items=catalogue.n_items, n_users=catalogue.n_users, side_vocab=catalogue.side_vocab,
            profile_vocab=catalogue.profile_vocab,
        )


@dataclass
class EpochReport:
    epoch: int
    loss: float
    targets_per_second: float
    seconds: float
    valid: dict[str, float]
    improved: bool


def auto_batch_size(n_sessions: int) -> int:
    """About 500 steps per epoch, between 16 and 256 sessions per batch: a small log still gets
    enough steps to move its embeddings, a large one the throughput of big batches. (A floor of 32
    left REES46, 735 training sessions, at 23 steps per epoch: validation recall@50 with 16
    instead, seed 0, GRU4Rec 0.728 -> 0.783, YouTube DNN 0.727 -> 0.796, SASRec 0.802 -> 0.782,
    SDM 0.829 -> 0.824; on MovieLens `u.data` alone, 4,196 sessions, SDM 0.377 -> 0.402,
    GRU4Rec 0.384 -> 0.386, SASRec 0.380 -> 0.382, YouTube DNN 0.316 -> 0.321.)"""
    return int(min(256, max(16, 2 ** math.ceil(math.log2(max(n_sessions, 1) / 500)))))


def learning_rate(config: TrainConfig, progress: float) -> float:
    """The rate at `progress` (share of the planned steps done, 0..1): linear warm-up over the
    first `warmup` share, then cosine decay to zero at the end of the last planned epoch."""
    if progress < config.warmup:
        return config.lr * (progress + 1e-3) / config.warmup
    decayed = (progress - config.warmup) / max(1 - config.warmup, 1e-9)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(decayed, 1.0)))


def uses_full_softmax(config: TrainConfig, n_items: int) -> bool:
    return config.loss == "full" or (config.loss == "auto" and n_items <= FULL_SOFTMAX_MAX_ITEMS)


LossFunction = Callable[[Tensor, Tensor, Recommender, torch.Generator], Tensor]


def make_loss(config: TrainConfig, item_counts: Tensor, ranks: Ranks = Ranks()) -> LossFunction:
    """The training loss as a function of (user vectors [N, d], targets [N], model, generator) -> the
    sum over the N targets; item_counts [n_items] are the training counts (in-batch negatives' logQ)."""
    n_items = len(item_counts)
    if uses_full_softmax(config, n_items):
        return lambda users, targets, model, generator: full_softmax_loss(users, targets, model.item_vectors(), "sum")
    if config.negatives == "in-batch":
        log_q = torch.log((item_counts.double() + 1) / (item_counts.sum() + n_items)).float().to(ranks.device)
        gather = ranks.gather if ranks.distributed else alone
        return lambda users, targets, model, generator: in_batch_softmax_loss(users, targets, model.vectors_of, log_q, gather, "sum")
    sampler = LogUniformSampler(n_items)
    return lambda users, targets, model, generator: sampled_softmax_loss(
        users, targets, model.vectors_of, sampler, config.num_negatives, generator, "sum"
    )


def loss_name(config: TrainConfig, n_items: int) -> str:
    if uses_full_softmax(config, n_items):
        return "full softmax"
    if config.negatives == "in-batch":
        return "in-batch sampled softmax (logQ)"
    return f"sampled softmax, {config.num_negatives} log-uniform negatives (logQ)"


class Objective(nn.Module):
    """A batch's summed loss as one module, so that under DDP every use of a parameter (the item
    tower embedding negatives included) happens inside the wrapped forward."""

    def __init__(self, model: Recommender, loss_fn: LossFunction):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """-> the sum of the losses of the batch's targets (a scalar)."""
        targets = batch["targets"]  # [B, T]
        predicts = targets > 0  # [B, T]
        user_vectors = self.model(batch)[predicts]  # [N, d]
        return self.loss_fn(user_vectors, targets[predicts], self.model, generator)


BATCH_ORDER, NEGATIVE_SAMPLES, DROPOUT_MASKS = range(3)  # the random streams of an epoch


def epoch_seed(seed: int, epoch: int, stream: int, rank: int = 0) -> int:
    """Batch order, negative samples and dropout masks (one stream per rank) depend only on
    (seed, epoch, stream, rank), so a resumed run repeats them."""
    return int(np.random.SeedSequence([seed, epoch, stream, rank]).generate_state(1)[0])


def epoch_generator(seed: int, epoch: int, stream: int = BATCH_ORDER) -> torch.Generator:
    return torch.Generator().manual_seed(epoch_seed(seed, epoch, stream))


def train_epoch(
    objective: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: SessionData,
    config: TrainConfig,
    epoch: int,
    ranks: Ranks = Ranks(),
    on_batch: Callable[[int, float], None] | None = None,
) -> tuple[float, int]:
    """One pass over the training sessions -> (mean loss per target, number of targets), over all
    ranks. `objective` is an Objective, or its DistributedDataParallel wrapper under DDP."""
    objective.train()
    torch.manual_seed(epoch_seed(config.seed, epoch, DROPOUT_MASKS, ranks.rank))
    negatives = epoch_generator(config.seed, epoch, NEGATIVE_SAMPLES)
    parameters = [p for p in objective.parameters() if p.requires_grad]
    total_loss, total_targets = torch.zeros((), dtype=torch.float64), 0
    global_batch = config.batch_size * ranks.world_size
    steps_per_epoch = max(1, -(-len(train) // global_batch))
    autocast = torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=config.bf16)
    batches = length_grouped_batches(train.tensors["lengths"], global_batch, epoch_generator(config.seed, epoch))
    for step, rows in enumerate(batches):
        start, stop = ranks.share(len(rows))
        batch = train.batch(rows[start:stop] if stop > start else rows[:1])
        if stop == start:  # a rank without rows joins the step with one row that predicts nothing
            batch["targets"].zero_()
        batch = to_device(batch, ranks.device)
        my_targets = int((batch["targets"] > 0).sum())
        n_targets = int(ranks.sum(torch.tensor(my_targets)))
        if n_targets == 0:
            continue
        with autocast:
            loss_sum = objective(batch, negatives)
        # DDP averages gradients over ranks: scaled so, they are the gradients of the mean loss
        # over the targets of all ranks.
        loss = loss_sum * (ranks.world_size / n_targets)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, (epoch + min(step / steps_per_epoch, 1.0)) / max(config.epochs, 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm)
        optimizer.step()
        total_loss += loss_sum.detach().double().cpu()
        total_targets += n_targets
        if on_batch is not None:
            on_batch(n_targets, float(loss_sum.detach()) / max(my_targets, 1))  # this rank's mean
    return float(ranks.sum(total_loss)) / max(total_targets, 1), total_targets


def resolve_exclude_seen(config: TrainConfig, data: Path) -> bool:
    """--exclude-seen/--include-seen, or without either: exclude where users never come back to an
    item (ratings, reviews), since there an item the user had can only take a slot from the next one."""
    if config.exclude_seen is not None:
        return config.exclude_seen
    return training_repeat_share(data) < NO_REPEATS_SHARE


def run_excludes_seen(run_config: dict[str, Any], asked: bool | None = None) -> bool:
    """--exclude-seen/--include-seen where given, else as the run's validation ranked (a run from
    before the choice existed ranked every item)."""
    return bool(run_config.get("exclude_seen", False)) if asked is None else asked


def count_targets(train: SessionData) -> int:
    return train.n_targets if train.n_targets is not None else int((train.tensors["targets"] > 0).sum())


def data_fingerprint(data: Path) -> str:
    require_stage(data, "splits")
    return manifest_digest(data / "splits")


def prepare_run(config: TrainConfig, resume: bool, world_size: int = 1) -> dict[str, Any] | None:
    """Check the run directory (reading only); return the checkpoint to resume from, if any."""
    run = Path(config.out)
    ensure_output_dir(run, create=False)
    if resume:
        if not (run / LAST).is_file():
            if (run / CONFIG).is_file():
                return None  # killed before its first checkpoint: start over
            raise InputError(f"{run}: nothing to resume (no {LAST}); drop --resume to start a new run")
        saved = read_run_config(run)
        # The run's own files first: a config.json or checkpoint copied from another run is named as such.
        checkpoint = load_checkpoint(run / LAST)
        check_same_run(checkpoint, run / LAST, saved)
        check_same_run(load_checkpoint(run / BEST), run / BEST, saved)  # written at the first epoch, kept unless beaten
        if not same_options(saved["train"], asdict(config)):
            raise InputError(f"{run}: --resume needs the same options as the original run (only --epochs may change)")
        if saved.get("world_size", 1) != world_size:
            raise InputError(
                f"{run}: was trained by {saved.get('world_size', 1)} process(es), not {world_size}; "
                "--resume needs the same number (batches span all processes)"
            )
        if saved["data_fingerprint"] != data_fingerprint(Path(config.data)):
            raise InputError(f"{run}: the data in {config.data} changed since this run started; start a new run")
        return checkpoint
    if (run / CONFIG).is_file():
        raise InputError(f"{run}: already holds a run; pass --resume to continue it or choose another --out")
    return None


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: Callable[[int], Callable[[int, float], None]] | None = None,
) -> list[dict[str, Any]]:
    """Train, checkpointing every epoch under config.out; return the per-epoch history.
    `progress(total_targets)` may return a per-batch callback (targets done, batch loss).
    Under torchrun this process is one rank of several (sdm.training.distributed); rank 0 locks the run
    directory (a second `sdm train` on it stops with a message) and alone writes to it."""
    ranks = join(config.device)
    try:
        if ranks.is_main:
            with run_lock(Path(config.out)):
                return train_ranks(config, ranks, resume=resume, on_epoch=on_epoch, progress=progress)
        return train_ranks(config, ranks, resume=resume, on_epoch=None, progress=None)
    finally:
        leave(ranks)


def train_ranks(
    config: TrainConfig,
    ranks: Ranks,
    *,
    resume: bool,
    on_epoch: Callable[[EpochReport], None] | None,
    progress: Callable[[int], Callable[[int, float], None]] | None,
) -> list[dict[str, Any]]:
    """`train` on every rank, once rank 0 holds the run's lock."""
    if config.threads:
        torch.set_num_threads(config.threads)
    data, run = Path(config.data), Path(config.out)
    checkpoint = prepare_run(config, resume, ranks.world_size)
    catalogue = load_catalogue(data)
    # Rank 0 builds the training tensors on first use while the other ranks wait; the barrier also
    # makes every rank check the run directory before rank 0 writes to it.
    train_data = load_training(data, catalogue) if ranks.is_main else None
    ranks.barrier()
    if train_data is None:
        train_data = load_training(data, catalogue)
    valid, valid_keys = load_cases(data, catalogue, "valid")
    if len(train_data) == 0:
        raise InputError(f"{data}: no training sessions; preprocess a longer log, or with fewer --test-days and --valid-days")
    if len(train_data) < ranks.world_size:
        raise InputError(f"{data}: {len(train_data)} training sessions cannot be shared by {ranks.world_size} processes")
    requested = config  # what the run directory records: --resume compares options, not their resolution
    exclude_seen = resolve_exclude_seen(config, data)
    if checkpoint is not None and run_excludes_seen(read_run_config(run)) != exclude_seen:
        flag = "--include-seen" if exclude_seen else "--exclude-seen"
        raise InputError(f"{run}: its validation ranked the users' seen items otherwise; resume it with {flag}")
    valid_seen = seen_items(data, valid_keys) if exclude_seen and len(valid) else None
    if config.batch_size == 0:
        config = replace(config, batch_size=auto_batch_size(len(train_data)))
    model_config = config.model_config(catalogue)
    torch.manual_seed(config.seed)
    model = build_model(config.model, model_config, catalogue.item_side, catalogue.item_counts, train_data.tensors["items"])
    model.to(ranks.device)
    if checkpoint is not None:
        restore(model, checkpoint, run / LAST)
    trainable = [p for p in model.parameters() if p.requires_grad]
    objective = Objective(model, make_loss(config, catalogue.item_counts, ranks))
    if ranks.distributed and trainable:
        objective = DistributedDataParallel(
            objective, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None, **NO_BUFFER_SYNC
        )
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, fused=True) if trainable else None

    run_config = {
        "train": asdict(requested),
        "batch_size": config.batch_size,
        "model": model_config.to_dict(),
        "catalogue": catalogue.vocab_sizes(),
        "data_fingerprint": data_fingerprint(data),
        "loss": loss_name(config, catalogue.n_items) if trainable else "none",
        "world_size": ranks.world_size,
        "exclude_seen": exclude_seen,
    }
    if ranks.is_main:
        run.mkdir(parents=True, exist_ok=True)
        write_run_json(run, CONFIG, run_config)

    history: list[dict[str, Any]] = []
    best_value, bad_epochs, start_epoch = -math.inf, 0, 0
    if checkpoint is not None:
        if optimizer is not None:
            restore(optimizer, checkpoint, run / LAST, "optimizer")
        history = json.loads(checkpoint["history"])
        best_value, bad_epochs, start_epoch = checkpoint["best_value"], checkpoint["bad_epochs"], checkpoint["epoch"] + 1
        if ranks.is_main:
            write_run_json(run, HISTORY, history)  # a kill between last.pt and history.json left it an epoch behind

    epochs = config.epochs if trainable else 1
    total_targets = count_targets(train_data)
    for epoch in range(start_epoch, epochs):
        if bad_epochs >= config.patience:
            break
        started = time.perf_counter()
        mean_loss = 0.0
        if optimizer is not None:
            on_batch = progress(total_targets) if progress is not None else None
            mean_loss, _ = train_epoch(objective, optimizer, train_data, config, epoch, ranks, on_batch)
        seconds = time.perf_counter() - started
        metrics = evaluate_shared(model, valid, config.ks, ranks, valid_seen) if len(valid) else {}
        value = metrics.get(config.select_metric, -mean_loss)
        improved = value > best_value
        best_value, bad_epochs = (value, 0) if improved else (best_value, bad_epochs + 1)
        report = EpochReport(epoch + 1, mean_loss, total_targets / seconds if optimizer else 0.0, seconds, metrics, improved)
        history.append(asdict(report))
        if ranks.is_main:
            with interrupts_deferred():
                save_epoch(run, model, optimizer, epoch, history, run_config, best_value, bad_epochs, improved)
            if on_epoch is not None:
                on_epoch(report)
    return history


def save_epoch(
    run: Path, model: Recommender, optimizer: torch.optim.Optimizer | None, epoch: int, history: list[dict[str, Any]],
    run_config: dict[str, Any], best_value: float, bad_epochs: int, improved: bool,
) -> None:
    """best.pt (when the epoch improved), last.pt and history.json, each written atomically."""
    state = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    if improved:
        save_checkpoint({"model": state, "epoch": epoch, "config": json.dumps(run_config)}, run / BEST)
    save_checkpoint(
        {
            "model": state,
            "optimizer": optimizer.state_dict() if optimizer is not None else {},
            "epoch": epoch,
            "history": json.dumps(history),
            "best_value": best_value,
            "bad_epochs": bad_epochs,
            "config": json.dumps(run_config),
        },
        run / LAST,
    )
    write_run_json(run, HISTORY, history)


def load_trained(run: Path) -> tuple[Recommender, dict[str, Any], Catalogue]:
    """The best model of a run, with its config and the catalogue of its data."""
    run_config = read_run_config(run)
    data = Path(run_config["train"]["data"])
    catalogue = load_catalogue(data)
    if data_fingerprint(data) != run_config["data_fingerprint"]:
        raise InputError(f"{run}: its data {data} changed since training; retrain or re-run preprocess with the old options")
    try:
        model = build_model(
            run_config["train"]["model"], ModelConfig.from_dict(run_config["model"]), catalogue.item_side, catalogue.item_counts
        )
    except (InputError, ValueError, TypeError, KeyError) as error:
        raise InputError(f"{run / CONFIG}: its model does not build ({error}); restore the run's own file, or retrain") from None
    best = load_checkpoint(run / BEST)
    check_same_run(best, run / BEST, run_config)
    restore(model, best, run / BEST)
    model.eval()
    return model, run_config, catalogue

