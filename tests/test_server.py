"""`sdm serve`: a real server process on a free 127.0.0.1 port, queried over HTTP with httpx. Its
answers equal `sdm recommend`'s and the model's own; bad requests get one line of JSON and a 4xx;
SIGTERM and Ctrl-C stop it cleanly."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import torch

from sdm.serving.export import run_fingerprint
from sdm.serving.server import MAX_BATCH, MAX_BODY_BYTES, Service, long_term_sets
from sdm.training.train import load_trained
from helpers.cli import child_env, run_sdm
from helpers.processes import REPO, SDM
from helpers.serving import items_seen_by, latest_session_inputs, raw_items, recommended
from helpers.training import TEST_THREADS, read_json, read_vocab

torch.set_num_threads(TEST_THREADS)

START_SECONDS = 120  # loading the run and binding, at most
STOP_SECONDS = 30
K = 10


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    client: httpx.Client

    def post(self, path: str, payload: object) -> httpx.Response:
        return self.client.post(path, json=payload)

    def stop(self, signum: int) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) after `signum`."""
        self.client.close()
        self.process.send_signal(signum)
        stdout, stderr = self.process.communicate(timeout=STOP_SECONDS)
        return self.process.returncode, stdout, stderr


@contextlib.contextmanager
def started(run: Path, *options: object) -> Iterator[Server]:
    """`sdm serve --run RUN --port 0 OPTIONS` in a child process; its announced address polled
    until /health answers (bounded in time)."""
    process = subprocess.Popen(
        [*SDM, "serve", "--run", str(run), "--host", "127.0.0.1", "--port", "0", *map(str, options)],
        cwd=REPO, env=child_env() | {"PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = process.stdout.readline()  # the announcement, or "" when the process ended
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, f"no address announced: {line!r} {process.stderr.read() if process.poll() is not None else ''}"
        url = f"http://127.0.0.1:{found.group(1)}"
        client = httpx.Client(base_url=url, timeout=30)
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer /health in time"
            time.sleep(0.1)
        yield Server(process, url, client)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=STOP_SECONDS)


@pytest.fixture(scope="module")
def server(sample_run) -> Iterator[Server]:
    with started(sample_run.path) as running:
        yield running


@pytest.fixture(scope="module")
def trained(sample_run):
    model, run_config, catalogue = load_trained(sample_run.path)
    return model, run_config, catalogue


@pytest.fixture(scope="module")
def users(sample_run) -> pl.DataFrame:
    return read_vocab(sample_run.data, "user")


def scores_for(model, batch: dict[str, torch.Tensor], excluded: set[int] = frozenset()) -> torch.Tensor:
    """Scores of every item for one row; padding and excluded items -inf."""
    with torch.no_grad():
        scores = (model.user_vectors(batch) @ model.item_vectors().T)[0]
    scores[0] = -torch.inf
    scores[sorted(excluded)] = -torch.inf
    return scores


def top_of(scores: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    ranked_scores, ranked_ids = scores.sort(descending=True, stable=True)
    return ranked_ids[:k].tolist(), ranked_scores[:k].tolist()


def answered_items(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [entry["item"] for entry in response.json()["items"]]


# --- the same answers as sdm recommend and the model ---------------------------------------------


def user_without_long_term_sets(data: Path) -> int:
    """The first user whose latest session has empty long-term sets (their first session)."""
    latest = pl.read_parquet(data / "sessions" / "sessions.parquet").sort("session").group_by("user").last()
    long_term = pl.read_parquet(data / "long_term" / "long_term.parquet")
    empty = latest.join(long_term, on="session").filter(pl.col("long_item").list.len() == 0)
    assert empty.height, "the sample data has no user whose latest session has empty long-term sets"
    return int(empty.get_column("user").min())


@pytest.mark.parametrize("user_rank, exclude_seen", [(0, False), (100, False), (7, True), ("empty long-term", False)])
def test_answers_equal_sdm_recommend_for_the_same_user(server, sample_run, users, user_rank, exclude_seen, trained):
    if user_rank == "empty long-term":
        user_rank = users.get_column("id").to_list().index(user_without_long_term_sets(sample_run.data))
    raw_user = users.get_column("raw")[user_rank]
    options = ("--exclude-seen",) if exclude_seen else ()
    expected = recommended(sample_run.path, raw_user, "-k", K, *options)
    response = server.post("/recommend", {"user": raw_user, "k": K, "exclude_seen": exclude_seen})
    answer = response.json()
    assert answered_items(response) == expected.get_column("item").to_list()
    np.testing.assert_allclose([e["score"] for e in answer["items"]], expected.get_column("score").to_numpy(), rtol=1e-5, atol=1e-5)
    sides = ("leaf", "category", "shop", "brand")
    assert [tuple(e[f] for f in sides) for e in answer["items"]] == list(expected.select(sides).iter_rows())
    assert [e["rank"] for e in answer["items"]] == list(range(1, K + 1))
    _, run_config, _ = trained
    assert (answer["source"], answer["known_user"], answer["fallback"]) == ("latest-session", True, None)
    assert (answer["model"], answer["fingerprint"]) == ("sdm", run_fingerprint(sample_run.path, run_config))


def test_batch_answers_equal_the_single_answers(server, users):
    requests = [
        {"user": users.get_column("raw")[3], "k": 5},
        {"user": "nobody-at-all", "k": 3},
        {"user": users.get_column("raw")[40], "k": 8, "exclude_seen": True},
        {"items": answered_items(server.post("/recommend", {"user": "nobody", "k": 2})), "k": 4},
    ]
    response = server.post("/recommend/batch", {"requests": requests})
    assert response.status_code == 200, response.text
    answers = response.json()["answers"]
    assert len(answers) == len(requests)
    for request, answer in zip(requests, answers):
        single = server.post("/recommend", request).json()
        assert [e["item"] for e in answer["items"]] == [e["item"] for e in single["items"]]
        np.testing.assert_allclose([e["score"] for e in answer["items"]], [e["score"] for e in single["items"]], rtol=1e-5, atol=1e-5)
        assert answer["source"] == single["source"]


def test_long_term_sets_of_a_new_session_are_those_preprocessing_builds(sample_run, trained):
    """The sets an ad-hoc session gets from the user's history, checked where preprocessing has the
    answer: a user's latest logged session, from the events of their earlier sessions."""
    _, _, catalogue = trained
    data = sample_run.data
    sessions = pl.read_parquet(data / "sessions" / "sessions.parquet")
    events = pl.read_parquet(data / "sessions" / "events.parquet")
    long_term = pl.read_parquet(data / "long_term" / "long_term.parquet")
    manifest = json.loads((data / "long_term" / "manifest.json").read_text())["fingerprint"]["params"]
    latest = sessions.sort("session").group_by("user").last().sort("user").head(60)
    checked_nonempty = 0
    for user, session, start in latest.select("user", "session", "start").iter_rows():
        earlier = events.filter((pl.col("user") == user) & (pl.col("session") < session)).sort("order")
        sets = long_term_sets(earlier.get_column("item").to_numpy(), earlier.get_column("time").to_numpy(), catalogue.item_side.numpy(),
                              catalogue.long_features, start, manifest["long_window_ms"], manifest["max_long"])
        row = long_term.filter(pl.col("session") == session)
        for feature in catalogue.long_features:
            assert sets[feature] == row.get_column(f"long_{feature}")[0].to_list(), (user, feature)
        checked_nonempty += bool(sets["item"])
    assert checked_nonempty > 10


def test_an_ad_hoc_session_of_a_known_user_uses_their_profile_and_history(server, sample_run, users, trained):
    model, _, catalogue = trained
    user, raw_user = users.row(5)[:2]
    session = answered_items(server.post("/recommend", {"user": "nobody", "k": 3}))
    response = server.post("/recommend", {"user": raw_user, "items": session, "k": K})
    answer = response.json()
    assert (answer["source"], answer["known_user"]) == ("request-session", True)

    events = pl.read_parquet(sample_run.data / "sessions" / "events.parquet").filter(pl.col("user") == user).sort("order")
    manifest = json.loads((sample_run.data / "long_term" / "manifest.json").read_text())["fingerprint"]["params"]
    times = events.get_column("time").to_numpy()
    sets = long_term_sets(events.get_column("item").to_numpy(), times, catalogue.item_side.numpy(), catalogue.long_features,
                          int(times.max()), manifest["long_window_ms"], manifest["max_long"])
    profile = pl.read_parquet(sample_run.data / "events" / "users.parquet").filter(pl.col("user") == user)
    id_of = dict(read_vocab(sample_run.data, "item").select("raw", "id").iter_rows())
    batch = {
        "items": torch.tensor([[id_of[raw] for raw in session]]), "lengths": torch.tensor([len(session)]),
        "profile": torch.tensor([list(profile.select(catalogue.profile_fields).row(0))]), "user": torch.tensor([user]),
        **{f"long_{f}": torch.tensor([values or [0]]) for f, values in sets.items()},
    }
    ids, scores = top_of(scores_for(model, batch), K)
    assert answered_items(response) == raw_items(sample_run.data, ids)
    np.testing.assert_allclose([e["score"] for e in answer["items"]], scores, rtol=1e-5, atol=1e-5)
    alone = server.post("/recommend", {"items": session, "k": K}).json()
    assert [e["score"] for e in alone["items"]] != [e["score"] for e in answer["items"]]


def test_exclusions_are_never_recommended(server, sample_run, users, trained):
    model, _, _ = trained
    user, raw_user = users.row(2)[:2]
    plain = answered_items(server.post("/recommend", {"user": raw_user, "k": K}))
    excluded = plain[:3]
    response = server.post("/recommend", {"user": raw_user, "k": K, "exclude": excluded, "exclude_seen": True})
    got = answered_items(response)
    seen = set(raw_items(sample_run.data, sorted(items_seen_by(sample_run.data, user))))
    assert len(got) == K and not set(got) & (set(excluded) | seen)
    inputs = latest_session_inputs(sample_run.data, trained[2], [user])
    id_of = dict(read_vocab(sample_run.data, "item").select("raw", "id").iter_rows())
    excluded_ids = items_seen_by(sample_run.data, user) | {id_of[raw] for raw in excluded}
    ids, _ = top_of(scores_for(model, inputs.batch(torch.arange(1)), excluded_ids), K)
    assert got == raw_items(sample_run.data, ids)


def test_unknown_users_fall_back_and_say_so(server, sample_run, trained):
    _, _, catalogue = trained
    popular = server.post("/recommend", {"user": "never-seen-user", "k": 5}).json()
    assert (popular["source"], popular["known_user"]) == ("popularity", False)
    assert "never-seen-user" in popular["fallback"] and "popular" in popular["fallback"]
    counts = catalogue.item_counts.clone()
    counts[0] = -1
    most = torch.argsort(-counts, stable=True)[:5].tolist()
    assert [e["item"] for e in popular["items"]] == raw_items(sample_run.data, most)

    session = [e["item"] for e in popular["items"][:2]]
    alone = server.post("/recommend", {"user": "never-seen-user", "items": session, "k": 5}).json()
    assert (alone["source"], alone["known_user"]) == ("session-only", False)
    assert "session alone" in alone["fallback"]


def test_health_and_info_describe_the_run_catalogue_and_index(server, sample_run, trained):
    _, run_config, catalogue = trained
    assert server.client.get("/health").json()["status"] == "ok"
    info = server.client.get("/info").json()
    assert info["fingerprint"] == run_fingerprint(sample_run.path, run_config)
    assert info["catalogue"]["items"] == catalogue.n_items - 1
    assert info["catalogue"]["side_features"] == catalogue.side_features
    assert info["index"]["kind"] == "exact"
    assert info["tower"] == "pytorch"  # no export for this run


# --- bad requests ---------------------------------------------------------------------------------


def big_body() -> Iterator[bytes]:
    """A chunked body (no Content-Length) past the limit."""
    chunk = b" " * 65536
    for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
        yield chunk


BAD_REQUESTS = {
    "malformed JSON": ("/recommend", {"content": b'{"user": ', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    "not JSON": ("/recommend", {"content": b"user=1", "headers": {"content-type": "application/x-www-form-urlencoded"}}, 400, "JSON"),
    "an array": ("/recommend", {"json": [1, 2]}, 400, "body"),
    "no body": ("/recommend", {"headers": {"content-type": "application/json"}}, 400, "JSON object"),
    "k as a string": ("/recommend", {"json": {"user": "u", "k": "5"}}, 400, "k"),
    "k as a float": ("/recommend", {"json": {"user": "u", "k": 5.5}}, 400, "k"),
    "k null": ("/recommend", {"json": {"user": "u", "k": None}}, 400, "k"),
    "k zero": ("/recommend", {"json": {"user": "u", "k": 0}}, 400, "k"),
    "k negative": ("/recommend", {"json": {"user": "u", "k": -3}}, 400, "k"),
    "k above the catalogue": ("/recommend", {"json": {"user": "u", "k": 10**12}}, 400, "catalogue"),
    "user as a number": ("/recommend", {"json": {"user": 12}}, 400, "user"),
    "items not a list": ("/recommend", {"json": {"items": "i1"}}, 400, "items"),
    "an empty session": ("/recommend", {"json": {"items": []}}, 400, "empty"),
    "unknown items": ("/recommend", {"json": {"items": ["no-such-item", "nor-this"]}}, 400, "no-such-item"),
    "unknown excluded items": ("/recommend", {"json": {"user": "u", "exclude": ["no-such-item"]}}, 400, "no-such-item"),
    "exclude_seen as a string": ("/recommend", {"json": {"user": "u", "exclude_seen": "yes"}}, 400, "exclude_seen"),
    "neither user nor items": ("/recommend", {"json": {"k": 5}}, 400, "user"),
    "an unknown field": ("/recommend", {"json": {"user": "u", "kk": 5}}, 400, "kk"),
    "megabytes declared": ("/recommend", {"json": {"items": ["x" * 100] * 20_000}}, 413, "bytes"),
    "megabytes chunked": ("/recommend", {"content": big_body, "headers": {"content-type": "application/json"}}, 413, "bytes"),
    "an empty batch": ("/recommend/batch", {"json": {"requests": []}}, 400, "requests"),
    "too large a batch": ("/recommend/batch", {"json": {"requests": [{"user": "u"}] * (MAX_BATCH + 1)}}, 400, "requests"),
    "a bad request in a batch": ("/recommend/batch", {"json": {"requests": [{"user": "u"}, {"items": []}]}}, 400, "requests[1]"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_with_one_line_of_json(server, case):
    path, arguments, status, mentioned = BAD_REQUESTS[case]
    if callable(arguments.get("content")):
        arguments = arguments | {"content": arguments["content"]()}
    response = server.client.post(path, **arguments)
    assert response.status_code == status, response.text
    assert "\n" not in response.text.strip()
    error = response.json()["error"]
    assert mentioned in error
    assert server.client.get("/health").status_code == 200  # and the server lives on


def test_unknown_endpoints_and_methods_get_a_4xx_with_json(server):
    missing = server.client.get("/nothing-here")
    assert missing.status_code == 404 and "/nothing-here" in missing.json()["error"]
    wrong_method = server.client.get("/recommend")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]


# --- loading once, reading one user's rows -------------------------------------------------------


@pytest.fixture(scope="module")
def service(sample_run) -> Service:
    return Service(sample_run.path)


def test_user_rows_hold_each_users_latest_session_sets_profile_and_events(service, sample_run, trained):
    """The in-memory rows a request reads equal the tables' rows of that user, for every user."""
    _, _, catalogue = trained
    data = sample_run.data
    latest = pl.read_parquet(data / "sessions" / "sessions.parquet").sort("session").group_by("user").last()
    long_term = pl.read_parquet(data / "long_term" / "long_term.parquet")
    expected = latest.join(long_term, on="session", how="left").join(pl.read_parquet(data / "events" / "users.parquet"), on="user", how="left")
    events = pl.read_parquet(data / "sessions" / "events.parquet").sort("user", "order")
    rows = service.users
    for row in expected.iter_rows(named=True):
        user = row["user"]
        assert rows.session[user].tolist() == row["items"], user
        for feature in catalogue.long_features:
            assert rows.long_term[feature][user].tolist() == (row[f"long_{feature}"] or []), (user, feature)
        assert rows.profile[user].tolist() == [row[f] or 0 for f in catalogue.profile_fields], user
    assert rows.has_session.sum() == expected.height
    by_user = events.partition_by("user", as_dict=True)
    for user in expected.get_column("user").to_list()[:200]:
        mine = by_user[(user,)]
        assert rows.event_items[user].tolist() == mine.get_column("item").to_list(), user
        assert rows.event_times[user].tolist() == mine.get_column("time").to_list(), user
    assert len(rows.event_items.values) == events.height
    assert service.info()["user_rows_bytes"] == rows.nbytes > 0


def test_requests_read_no_whole_table_and_load_nothing_again(service, users, monkeypatch):
    """After start, answering reads nothing from DATA: a Parquet read or scan, or a new index or
    model load during requests would fail here."""
    from fastapi.testclient import TestClient

    import sdm.serving.ann
    import sdm.training.train
    from sdm.serving.server import create_app

    def forbidden(*args, **kwargs):
        raise AssertionError("called while answering a request")

    client = TestClient(create_app(service))
    for name in ("read_parquet", "scan_parquet", "read_csv", "read_ipc"):
        monkeypatch.setattr(pl, name, forbidden)
    monkeypatch.setattr(sdm.training.train, "load_trained", forbidden)
    monkeypatch.setattr(sdm.serving.ann, "build_index", forbidden)
    raw_user = users.get_column("raw")[11]
    assert client.post("/recommend", json={"user": raw_user, "k": 5, "exclude_seen": True}).status_code == 200
    session = [entry["item"] for entry in client.post("/recommend", json={"user": "x", "k": 2}).json()["items"]]
    assert client.post("/recommend", json={"user": raw_user, "items": session, "k": 5}).status_code == 200
    assert client.post("/recommend/batch", json={"requests": [{"user": raw_user}, {"items": session}]}).status_code == 200


# --- indexes, workers, stopping, bad options --------------------------------------------------------


@pytest.mark.slow  # 18 s: the default suite was 4:56 of its 5 minutes; python -m pytest -m slow
def test_a_server_uses_the_exported_onnx_tower_and_hnsw_index_and_stops_on_ctrl_c(sample_run, users, server, tmp_path):
    run = Path(shutil.copytree(sample_run.path, tmp_path / "run"))
    # In a process of its own: a second ONNX export in one process (tests/test_export.py exports
    # in this one) gets a fixed session length from torch.export.
    subprocess.run([*SDM, "export", "--run", str(run), "--index", "hnsw"], cwd=REPO, env=child_env(), check=True,
                   capture_output=True, timeout=600)
    with started(run, "--index", "hnsw") as hnsw:
        info = hnsw.client.get("/info").json()
        assert info["tower"].startswith("onnxruntime") and "user_tower.onnx" in info["tower"]
        assert info["index"]["kind"] == "hnsw" and info["index"]["source"].endswith("index.faiss")
        assert info["index"]["params"] == read_json(run / "export" / "manifest.json")["index"]["params"]
        found = expected = 0
        for raw_user in users.get_column("raw")[:20].to_list():
            exact = {e["item"]: e["score"] for e in server.post("/recommend", {"user": raw_user, "k": 50}).json()["items"]}
            approximate = {e["item"]: e["score"] for e in hnsw.post("/recommend", {"user": raw_user, "k": 50}).json()["items"]}
            assert len(approximate) == 50
            both = sorted(exact.keys() & approximate.keys())
            # onnxruntime's user vectors are PyTorch's within float rounding (tests/test_export.py)
            np.testing.assert_allclose([approximate[i] for i in both], [exact[i] for i in both], rtol=1e-4, atol=1e-4)
            found, expected = found + len(both), expected + len(exact)
        assert found / expected >= 0.95
        code, stdout, stderr = hnsw.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "stopped" in stdout and "Traceback" not in stderr


def test_an_ivf_index_built_at_start_finds_nearly_all_of_the_exact_answer(sample_run, service, users):
    """No export of this run: the index is built at start, with the default parameters."""
    ivf = Service(sample_run.path, "ivf")
    info = ivf.info()["index"]
    assert info["source"] == "built at start" and info["params"]["nprobe"] == max(1, info["params"]["nlist"] // 16)
    found = expected = 0
    for raw_user in users.get_column("raw")[:20].to_list():
        request = [{"user": raw_user, "items": None, "k": 50, "exclude": [], "exclude_seen": False}]
        exact = {e["item"] for e in service.answer(request)[0]["items"]}
        approximate = [e["item"] for e in ivf.answer(request)[0]["items"]]
        assert len(approximate) == 50
        found, expected = found + len(exact & set(approximate)), expected + len(exact)
    assert found / expected >= 0.95


@pytest.mark.slow  # over the 5-minute budget of the default suite; python -m pytest -m slow
def test_two_workers_answer_alike_and_stop_on_sigterm(sample_run, users, server):
    with started(sample_run.path, "--workers", "2") as pair:
        for raw_user in users.get_column("raw")[:6].to_list():
            request = {"user": raw_user, "k": K}
            assert answered_items(pair.post("/recommend", request)) == answered_items(server.post("/recommend", request))
        code, stdout, stderr = pair.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "stopped" in stdout and "Traceback" not in stderr


def test_sigterm_stops_a_server_cleanly(sample_run):
    with started(sample_run.path) as single:
        assert single.post("/recommend", {"user": "x", "k": 1}).status_code == 200
        code, stdout, stderr = single.stop(signal.SIGTERM)
    assert code == 0, stderr
    assert "stopped" in stdout and "Traceback" not in stderr


def test_connections_to_the_server_socket_send_without_delay():
    """asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that say they are TCP;
    with it on, each keep-alive answer waited for the client's delayed ACK (~40 ms)."""
    import asyncio

    from sdm.serving.server import listening_socket

    async def accepted_nodelay() -> int:
        settings: list[int] = []

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                settings.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        sock = listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*sock.getsockname()), 10)
            for _ in range(100):  # bounded: the server side's connection_made follows the connect
                if settings:
                    break
                await asyncio.sleep(0.05)
            writer.close()
        return settings[0]

    assert asyncio.run(accepted_nodelay()) != 0


def test_serve_refuses_bad_options_in_one_line(sample_run, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (("--run", sample_run.path, "--index", "annoy"), "--index"),
            (("--run", tmp_path / "no-run"), "no-run"),
            (("--run", sample_run.path, "--workers", "0"), "--workers"),
            (("--run", sample_run.path, "--port", port), str(port)),
        ]
        for options, mentioned in cases:
            outcome = run_sdm("serve", *options)
            assert outcome.exit_code == 2, (options, outcome.output)
            lines = outcome.stderr.strip().splitlines()
            assert len(lines) == 1 and mentioned in lines[0], (options, outcome.stderr)
