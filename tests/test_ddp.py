"""Training with several processes (DDP under torchrun), on two CPU processes of this machine.

The claim under test is the one the trainer's docstring makes: two ranks with B sessions each take
the step one process takes with 2B sessions (same global batches, same negatives, the mean over
all targets), so after a few steps the parameters agree up to the order of float sums, while a
process with B sessions, a genuinely different run, ends far away. Dropout is off: its masks are
drawn per rank and could not match one process's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch

import cli.app
from helpers.cli import child_env, invoke, run_sdm
from helpers.training import SMALL_MODEL, SMALL_MODEL_ARGS, read_json
from sdm.training.checkpoint import BEST, CONFIG, HISTORY, LAST, load_checkpoint
from sdm.training.distributed import Ranks
from sdm.evaluation.evaluate import evaluate_split
from sdm.training.train import TrainConfig, load_trained, train

BATCH = 64  # per rank
LOSSES = {
    "full": (),
    "sampled": ("--loss", "sampled", "--num-negatives", "50"),
    "in-batch": ("--loss", "sampled", "--negatives", "in-batch"),
}
# In-batch negatives through two one-process "nodes" cost the module fixture a third pair of
# processes: over the default suite's 5-minute budget, run with -m slow.
DEFAULT_LOSSES = ("full", "sampled")
DDP_TIMEOUT = 240


def ddp_options(data: Path, epochs: int, loss: str) -> tuple[str, ...]:
    return (
        "--data", str(data), "--epochs", str(epochs), "--patience", "5", "--batch-size", str(BATCH), "--dropout", "0",
        "--dim", "16", "--heads", "2", "--lstm-layers", "1", "--threads", "1", *LOSSES[loss],
    )


TORCHRUN = (sys.executable, "-m", "torch.distributed.run")


def torchrun_command(*options: str) -> list[str]:
    """`torchrun --standalone --nproc-per-node 2 -m sdm train OPTIONS`, as the README documents it."""
    return [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "sdm", "train", *options]


def two_node_commands(*options: str) -> list[list[str]]:
    """Two torchrun launchers of one process each meeting at a c10d rendezvous, as two machines
    would (the README's multi-node command, with both "machines" on this one)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rendezvous = ("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}")
    return [[*TORCHRUN, *rendezvous, "--rdzv-id", "test", "-m", "sdm", "train", *options]] * 2


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())


def finish(launchers: list[subprocess.Popen]) -> list[subprocess.CompletedProcess]:
    outputs = [launcher.communicate(timeout=DDP_TIMEOUT) for launcher in launchers]
    return [
        subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr)
        for launcher, (stdout, stderr) in zip(launchers, outputs, strict=True)
    ]


def torchrun(*options: str, cwd: Path) -> subprocess.CompletedProcess:
    return finish([start(torchrun_command(*options), cwd)])[0]


def one_process_config(data: Path, out: Path, loss: str, batch_size: int, epochs: int = 1) -> TrainConfig:
    options = dict(zip(LOSSES[loss][::2], LOSSES[loss][1::2]))
    return TrainConfig(
        data=str(data), out=str(out), epochs=epochs, patience=5, batch_size=batch_size, dropout=0.0, threads=1,
        loss=options.get("--loss", "auto"), negatives=options.get("--negatives", "log-uniform"),
        num_negatives=int(options.get("--num-negatives", 1000)), **SMALL_MODEL,
    )


def launch_all(commands: dict[str, list[list[str]]], root: Path) -> dict[str, Path]:
    """Start every run's launchers at once, wait for all; each run's directory and rank 0's stdout."""
    runs: dict[str, Path] = {}
    launched = {loss: [start(command, root) for command in group] for loss, group in commands.items()}
    for loss, launchers in launched.items():
        finished = finish(launchers)
        # the launchers' whole stderr as text: a list's repr is cut to its two ends in the report
        assert all(process.returncode == 0 for process in finished), "\n".join(process.stderr for process in finished)
        runs[loss], runs[f"{loss}-stdout"] = root / loss, finished[0].stdout
    return runs


@pytest.fixture(scope="module")
def ddp_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """One-epoch two-rank runs: full softmax through `sdm train --nproc 2`, sampled through
    `torchrun --nproc-per-node 2`."""
    root = tmp_path_factory.mktemp("ddp")
    return launch_all({
        "full": [["sdm", "train", *ddp_options(tiny_data, 1, "full"), "--out", str(root / "full"), "--nproc", "2"]],
        "sampled": [torchrun_command(*ddp_options(tiny_data, 1, "sampled"), "--out", str(root / "sampled"))],
    }, root)


@pytest.fixture(scope="module")
def in_batch_runs(tiny_data, tmp_path_factory) -> dict[str, Path]:
    """A one-epoch run with in-batch negatives through two one-process torchrun "nodes"."""
    root = tmp_path_factory.mktemp("ddp_in_batch")
    return launch_all({"in-batch": two_node_commands(*ddp_options(tiny_data, 1, "in-batch"), "--out", str(root / "in-batch"))}, root)


def parameter_distance(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    return max(float((first[name] - second[name]).abs().max()) for name in first if first[name].is_floating_point())


@pytest.mark.parametrize("loss", [*DEFAULT_LOSSES, pytest.param("in-batch", marks=pytest.mark.slow)])
def test_two_ranks_with_batch_b_step_like_one_process_with_batch_2b(loss, request, tiny_data, tmp_path):
    ddp_runs = request.getfixturevalue("in_batch_runs" if loss == "in-batch" else "ddp_runs")
    two_ranks = load_checkpoint(ddp_runs[loss] / LAST)["model"]
    train(one_process_config(tiny_data, tmp_path / "2b", loss, 2 * BATCH))
    train(one_process_config(tiny_data, tmp_path / "b", loss, BATCH))
    same_steps = parameter_distance(two_ranks, load_checkpoint(tmp_path / "2b" / LAST)["model"])
    other_steps = parameter_distance(two_ranks, load_checkpoint(tmp_path / "b" / LAST)["model"])
    # Tolerance: 1e-3 in any parameter (measured: about 5e-5 after one epoch, all from the order of
    # float sums), against about 1e-2 for a run with other batches.
    assert same_steps < 1e-3, same_steps
    assert other_steps > 10 * same_steps, (same_steps, other_steps)
    histories = read_json(ddp_runs[loss] / HISTORY)["epochs"], read_json(tmp_path / "2b" / HISTORY)["epochs"]
    assert histories[0][0]["loss"] == pytest.approx(histories[1][0]["loss"], rel=1e-5)


def test_validation_metrics_of_two_ranks_are_those_of_every_case(ddp_runs, tiny_data):
    # Each rank ranks half of the validation cases; the history must hold the metrics of all of them.
    (epoch,) = read_json(ddp_runs["full"] / HISTORY)["epochs"]
    model, _, catalogue = load_trained(ddp_runs["full"])
    recomputed = evaluate_split(model, tiny_data, catalogue, "valid", [10, 20, 50, 100])
    assert epoch["valid"]["n_cases"] == recomputed["n_cases"] > 1
    assert epoch["valid"] == pytest.approx(recomputed, abs=1e-12)


def test_rank_zero_alone_writes_the_run_and_the_log(ddp_runs):
    run = ddp_runs["full"]
    assert {path.name for path in run.iterdir()} == {CONFIG, HISTORY, LAST, BEST, ".sdm.lock"}
    assert read_json(run / CONFIG)["world_size"] == 2
    stdout = ddp_runs["full-stdout"]
    assert stdout.count("epoch   1  loss") == 1 and stdout.count("run saved in") == 1, stdout


@pytest.mark.slow  # over the 5-minute budget of the default suite; python -m pytest -m slow
def test_a_resumed_ddp_run_goes_on_with_the_steps_it_would_have_taken(ddp_runs, tiny_data, tmp_path):
    # The sampled-loss run (1 epoch) continued for a second epoch must still take the steps of one
    # process with 2B sessions trained for 1 epoch and continued for a second: the same batches,
    # negatives, learning rates and optimiser state.
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(ddp_runs["sampled"]), str(resumed)], check=True)
    continued = torchrun(*ddp_options(tiny_data, 2, "sampled"), "--out", str(resumed), "--resume", cwd=tmp_path)
    assert continued.returncode == 0, continued.stderr
    history = read_json(resumed / HISTORY)["epochs"]
    assert [entry["epoch"] for entry in history] == [1, 2]
    for name, batch in (("2b", 2 * BATCH), ("b", BATCH)):
        one_epoch = one_process_config(tiny_data, tmp_path / name, "sampled", batch, epochs=1)
        train(one_epoch)
        train(replace(one_epoch, epochs=2), resume=True)
    two_ranks = load_checkpoint(resumed / LAST)["model"]
    same_steps = parameter_distance(two_ranks, load_checkpoint(tmp_path / "2b" / LAST)["model"])
    assert same_steps < 1e-3 and parameter_distance(two_ranks, load_checkpoint(tmp_path / "b" / LAST)["model"]) > 10 * same_steps
    assert history[1]["loss"] == pytest.approx(read_json(tmp_path / "2b" / HISTORY)["epochs"][1]["loss"], rel=1e-5)


def test_resuming_with_another_number_of_processes_is_refused_before_any_starts(ddp_runs, tiny_data, tmp_path):
    before = {path.name: path.read_bytes() for path in ddp_runs["full"].iterdir() if path.is_file()}
    outcome = run_sdm("train", *ddp_options(tiny_data, 2, "full"), "--out", ddp_runs["full"], "--resume")
    assert outcome.exit_code == 2, outcome.output
    assert "2 process(es), not 1" in outcome.stderr and len(outcome.stderr.strip().splitlines()) == 1
    assert {path.name: path.read_bytes() for path in ddp_runs["full"].iterdir() if path.is_file()} == before


@pytest.mark.parametrize(
    ("options", "message"),
    [(("--nproc", "0"), "--nproc"), (("--device", "tpu"), "--device"), (("--nproc", "2", "--resume"), "nothing to resume")],
)
def test_bad_launch_options_are_one_line_errors(options, message, tiny_data, tmp_path):
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "run", *options, *SMALL_MODEL_ARGS)
    assert outcome.exit_code == 2 and message in outcome.stderr, outcome.output
    assert len(outcome.stderr.strip().splitlines()) == 1 and "Traceback" not in outcome.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_device_cuda_without_a_gpu_says_so(tiny_data, tmp_path):
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "run", "--device", "cuda", *SMALL_MODEL_ARGS)
    assert outcome.exit_code == 2 and "no CUDA device" in outcome.stderr and "--device cpu" in outcome.stderr, outcome.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_a_gpu_learns_and_evaluates(bf16, tiny_data, tmp_path):
    config = replace(one_process_config(tiny_data, tmp_path / "run", "sampled", 128, epochs=2), device="cuda", bf16=bf16)
    history = train(config)
    assert history[1]["loss"] < history[0]["loss"]
    assert history[1]["valid"]["recall@50"] > 0


def test_bf16_autocast_trains_on_the_cpu_too(tiny_data, tmp_path):
    history = train(replace(one_process_config(tiny_data, tmp_path / "run", "full", 128, epochs=2), device="cpu", bf16=True))
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in history)
    assert history[1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("world_size", [1, 2, 3, 7])
def test_rank_shares_cover_every_item_once_in_order(world_size):
    for n in (0, 1, 5, 100, 101):
        shares = [Ranks(rank, world_size).share(n) for rank in range(world_size)]
        assert shares[0][0] == 0 and shares[-1][1] == n
        assert all(previous[1] == current[0] for previous, current in zip(shares, shares[1:]))
        assert max(stop - start for start, stop in shares) - min(stop - start for start, stop in shares) <= 1


def test_the_ranks_get_exactly_the_config_sdm_train_builds(tiny_data, tmp_path):
    # `sdm train --nproc N` hands each rank its TrainConfig itself: every kind of option, booleans
    # both ways, arrives as one process would have it, with --threads resolved to cores / N.
    options = (
        "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--epochs", "3", "--batch-size", "32", "--lr", "0.01",
        "--dim", "24", "--heads", "3", "--lstm-layers", "1", "--dropout", "0.1", "--fusion", "concat", "--no-side-info",
        "--user-id", "--no-tie-output", "--loss", "sampled", "--negatives", "in-batch", "--num-negatives", "77",
        "--patience", "2", "--select-metric", "ndcg@25", "--seed", "9", "--device", "cpu", "--bf16", "--quiet",
    )
    one_process, launched = {}, {}
    with mock.patch.object(cli.app, "run_training", lambda config, **flags: one_process.update(config=config, **flags)):
        assert invoke("train", *options).exit_code == 0

    def launcher(launch, entrypoint):
        return lambda *arguments: launched.update(nproc=launch.nproc_per_node, entrypoint=entrypoint, arguments=arguments)

    with mock.patch("torch.distributed.launcher.api.elastic_launch", launcher):
        assert invoke("train", *options, "--nproc", "2").exit_code == 0
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert launched["nproc"] == 2 and launched["entrypoint"] is cli.app.train_rank
    assert launched["arguments"] == (replace(one_process["config"], threads=threads), False, True)


def test_nproc_inside_torchrun_is_refused(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    outcome = run_sdm("train", "--data", tiny_data, "--out", tmp_path / "run", "--nproc", "2", *SMALL_MODEL_ARGS)
    assert outcome.exit_code == 2 and "--nproc-per-node" in outcome.stderr, outcome.output


def test_ctrl_c_stops_every_rank_with_one_message_and_a_resumable_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    options = (*ddp_options(tiny_data, 50, "sampled"), "--out", str(run), "--nproc", "2", "--quiet")
    launcher = subprocess.Popen(["sdm", "train", *options], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=child_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + DDP_TIMEOUT
        while not (run / LAST).is_file() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole group gets it
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert sum("interrupted" in line for line in lines) == 1 and "Traceback" not in stderr, stderr
    completed = load_checkpoint(run / LAST)["epoch"] + 1
    assert 1 <= completed < 50 and len(read_json(run / HISTORY)["epochs"]) == completed
