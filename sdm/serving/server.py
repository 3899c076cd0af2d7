"""`sdm serve`: top-K items for a user now, over HTTP (FastAPI on uvicorn).

Loaded once, at start (`Service`): the model, the item vectors, the faiss index (from RUN/export
when `sdm export --index` wrote one for this run, else built), the raw ids and side values of
every item, popularity, and `UserRows`: every user's latest session, long-term sets, profile and
logged events as flat arrays indexed by dense user id. A request reads slices of its own user's
rows there and nothing else: its work grows with that user's history, not with the tables.

Requests (JSON):
    POST /recommend        {"user": "<raw id>", "items": ["<raw id>", ...], "k": 50,
                            "exclude": ["<raw id>", ...], "exclude_seen": true}
    POST /recommend/batch  {"requests": [<as above>, ...]}
    GET  /health, GET /info
A known user without "items" gets the answer of `sdm recommend`: their latest logged session
with its long-term sets. With "items", those are the current session (events the log has not
seen yet); a known user adds the long-term sets of their whole logged history, as if the session
began at their last logged event. An unknown user is ranked from the session alone, or by
popularity without one; the answer's "source" and "fallback" say which. Without "exclude_seen",
the user's earlier items are ranked or skipped as the run's validation did (`exclude_seen` in /info).

Every bad request gets a 4xx with one line of JSON, {"error": "..."}.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import polars as pl
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from torch import Tensor

from pipeline.cache import package_version, read_manifest
from pipeline.errors import InputError
from pipeline.contract import DataDir, long_term_column
from sdm.data.sessions import Batch, Catalogue
from sdm.serving.export import tower_arguments, tower_input_names
from sdm.evaluation.retrieval import top_k

SERVE_INDEXES = ("exact", "flat", "hnsw", "ivf")
MAX_BODY_BYTES = 1 << 20  # a request of 1 MiB holds tens of thousands of ids: more is an error
MAX_BATCH = 256  # requests in one /recommend/batch
MAX_IDS = 10_000  # ids in one request's "items" or "exclude"
DEFAULT_K = 50
RUN_ENV, INDEX_ENV = "SDM_SERVE_RUN", "SDM_SERVE_INDEX"  # how `--workers N` hands the options to its processes

log = logging.getLogger("sdm.serving.server")


class BadRequest(Exception):
    """A request the server cannot answer as asked: 400 with this message."""


@dataclass
class Prepared:
    """One request turned into model inputs: the batch row, what to exclude, how it was answered."""

    row: Batch | None  # None: ranked by popularity
    exclude: list[int]
    user: str | None
    known_user: bool
    source: str  # latest-session, request-session, session-only or popularity
    fallback: str | None


def long_term_sets(
    items: np.ndarray, times: np.ndarray, item_side: np.ndarray, features: list[str], reference_time: int,
    window_ms: int | None, max_long: int,
) -> dict[str, list[int]]:
    """The long-term sets of a session starting at `reference_time`, from one user's earlier
    events in log order (their items and times), as `sdm preprocess` builds them
    (pipeline.long_term): per feature, the distinct non-null values of the events at or after
    reference_time - window, most recent first, at most max_long."""
    if window_ms is not None:
        items = items[times >= reference_time - window_ms]
    items = items[::-1].astype(np.int64)
    columns = {"item": items, **{f: item_side[items, j] for j, f in enumerate(features[1:])}}
    sets = {}
    for feature in features:
        values = columns[feature]
        _, first = np.unique(values, return_index=True)
        distinct = values[np.sort(first)]  # in order of first occurrence: most recent first
        sets[feature] = distinct[distinct != 0][:max_long].tolist()
    return sets


@dataclass
class Ragged:
    """Variable-length rows by dense id: row i is values[offsets[i]:offsets[i + 1]]."""

    offsets: np.ndarray  # int64 [n_rows + 1]
    values: np.ndarray

    def __getitem__(self, row: int) -> np.ndarray:
        return self.values[self.offsets[row]:self.offsets[row + 1]]

    @classmethod
    def of(cls, keys: pl.Series, values: pl.Series, n_rows: int, dtype: Any) -> Ragged:
        """Rows from (key, value) pairs sorted by key; keys without pairs get empty rows."""
        counts = np.bincount(keys.to_numpy(), minlength=n_rows)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), values.to_numpy().astype(dtype))

    @classmethod
    def of_lists(cls, keys: pl.Series, lists: pl.Series, n_rows: int, dtype: Any) -> Ragged:
        """Rows from a list column, one list per distinct key, sorted by key."""
        pairs = pl.DataFrame({"key": keys, "value": lists}).explode("value").drop_nulls()  # empty lists explode to null
        return cls.of(pairs.get_column("key"), pairs.get_column("value"), n_rows, dtype)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.values.nbytes


class UserRows:
    """What requests read of DATA, for every user at once, by dense user id: the latest session
    (its id and items, as `sdm recommend` picks it), that session's long-term sets, the profile,
    and the logged events in log order (item, time) for exclude_seen and for the long-term sets
    of a session the request brings. Built at start with polars joins and numpy offsets (no loop
    over users); item ids are int32, times int64, and every ragged field costs 8 bytes per user
    in offsets (`nbytes` is in /info)."""

    def __init__(self, data: Path, catalogue: Catalogue):
        from sdm.serving.recommend import latest_sessions

        n_users = catalogue.n_users
        latest = latest_sessions(data)  # (user, session, items), sorted by user
        self.has_session = np.zeros(n_users, dtype=bool)
        self.has_session[latest.get_column("user").to_numpy()] = True
        self.session = Ragged.of_lists(latest.get_column("user"), latest.get_column("items"), n_users, np.int32)
        columns = [long_term_column(f) for f in catalogue.long_features]
        long_term = (
            pl.scan_parquet(DataDir(data).long_term).select("session", *columns)
            .join(latest.lazy().select("session", "user"), on="session").sort("user").collect()
        )
        self.long_term = {
            feature: Ragged.of_lists(long_term.get_column("user"), long_term.get_column(column), n_users, np.int32)
            for feature, column in zip(catalogue.long_features, columns)
        }
        self.profile = np.zeros((n_users, len(catalogue.profile_fields)), dtype=np.int64)
        if catalogue.profile_fields:  # polars gives no rows at all for a selection of no columns
            profiles = pl.read_parquet(DataDir(data).users, columns=["user", *catalogue.profile_fields])
            self.profile[profiles.get_column("user").to_numpy()] = profiles.select(catalogue.profile_fields).fill_null(0).to_numpy()
        events = (
            pl.scan_parquet(DataDir(data).session_events).select("user", "order", "item", "time")
            .sort("user", "order").collect()
        )
        self.event_items = Ragged.of(events.get_column("user"), events.get_column("item"), n_users, np.int32)
        self.event_times = Ragged.of(events.get_column("user"), events.get_column("time"), n_users, np.int64)

    @property
    def nbytes(self) -> int:
        ragged = [self.session, *self.long_term.values(), self.event_items, self.event_times]
        return sum(r.nbytes for r in ragged) + self.profile.nbytes + self.has_session.nbytes


class Service:
    """A trained run, loaded once, answering recommendation requests (thread-safe: requests only read)."""

    def __init__(self, run: Path, index: str = "exact"):
        from sdm.serving.export import read_export_manifest, run_fingerprint
        from sdm.training.train import load_trained, run_excludes_seen

        if index not in SERVE_INDEXES:
            raise InputError(f"--index {index!r}: expected one of {', '.join(SERVE_INDEXES)}")
        model, run_config, catalogue = load_trained(run)
        model.eval()  # once: requests only read the model
        self.run, self.model, self.catalogue = run, model, catalogue
        self.model_name = run_config["train"]["model"]
        self.data = Path(run_config["train"]["data"])
        self.fingerprint = run_fingerprint(run, run_config)
        self.exclude_seen = run_excludes_seen(run_config)  # what a request without "exclude_seen" gets
        with torch.no_grad():
            self.item_vectors = model.item_vectors().detach().float().contiguous()  # [n_items, d], row 0 = padding
        self.n_items = catalogue.n_items - 1
        layout = DataDir(self.data)
        items = pl.read_parquet(layout.vocabulary("item"), columns=["id", "raw"]).sort("id")
        self.item_raw = np.array([None, *items.get_column("raw").to_list()], dtype=object)  # dense id -> raw id
        self.item_id = dict(zip(items.get_column("raw").to_list(), items.get_column("id").to_list()))
        users = pl.read_parquet(layout.vocabulary("user"), columns=["id", "raw"])
        self.user_id = dict(zip(users.get_column("raw").to_list(), users.get_column("id").to_list()))
        self.side_values = {}  # feature -> [n_items] raw side value of every item (None: none)
        for j, feature in enumerate(catalogue.side_features):
            side = pl.read_parquet(layout.vocabulary(feature), columns=["id", "raw"])
            raw = np.full(catalogue.side_vocab[feature], None, dtype=object)
            raw[side.get_column("id").to_numpy()] = side.get_column("raw").to_list()
            self.side_values[feature] = raw[catalogue.item_side[:, j].numpy()]
        # Most trained-on first, ties to the smaller id, as top_k breaks them.
        counts = catalogue.item_counts[1:].numpy()
        self.popular = np.lexsort((np.arange(len(counts)), -counts)) + 1
        self.item_counts = catalogue.item_counts.numpy()
        long_params = (read_manifest(self.data / "long_term") or {}).get("fingerprint", {}).get("params", {})
        session_params = (read_manifest(self.data / "sessions") or {}).get("fingerprint", {}).get("params", {})
        self.long_window_ms = long_params.get("long_window_ms")
        self.max_long = int(long_params.get("max_long", 20))
        self.max_session = int(session_params.get("max_session_length", 50))
        self.users = UserRows(self.data, catalogue)
        self.item_side = catalogue.item_side.numpy()
        exported = read_export_manifest(self.run / "export")
        self.exported = exported if exported is not None and exported.get("fingerprint") == self.fingerprint else {}
        self.tower, self.tower_source = self.load_tower()
        self.index_kind, self.index, self.index_source = index, None, None
        if index != "exact":
            self.index, self.index_source = self.load_index(index)

    def load_tower(self) -> tuple[Any, str]:
        """onnxruntime's session of the ONNX user tower `sdm export` wrote for this very run, else
        None (PyTorch's model): on one row, onnxruntime took 0.3 ms where PyTorch's eager
        modules took 1.4 ms (docs/benchmarks.md), equal within the export's checked tolerance."""
        if (self.exported.get("tower") or {}).get("format") != "onnx":
            return None, "pytorch"
        try:
            import onnxruntime
        except ImportError:
            return None, "pytorch (onnxruntime is not installed)"
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # as configure_threads, for the same reason
        path = self.run / "export" / self.exported["tower"]["file"]
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), f"onnxruntime ({path})"

    def load_index(self, kind: str):
        """The index `sdm export --index KIND` wrote for this very run, or one built now."""
        from sdm.serving.ann import build_index

        import faiss

        entry = self.exported.get("index") or {}
        if entry.get("kind") == kind:
            try:
                index = faiss.read_index(str(self.run / "export" / str(entry.get("file"))))
            except RuntimeError:  # a damaged or missing file: built now, as for another run's index
                index = None
            if index is not None and index.ntotal == self.n_items:
                return index, str(self.run / "export" / entry["file"])
        return build_index(self.item_vectors, kind), "built at start"

    # --- requests ----------------------------------------------------------------------------

    def item_ids(self, raw_items: list[str], field: str) -> list[int]:
        unknown = [raw for raw in raw_items if raw not in self.item_id]
        if unknown:
            shown = ", ".join(json.dumps(raw) for raw in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise BadRequest(f"{field}: unknown item ids {shown}{more} (not in the run's catalogue)")
        return [self.item_id[raw] for raw in raw_items]

    def check_k(self, k: int) -> None:
        if not 1 <= k <= self.n_items:
            raise BadRequest(f"k: expected 1 to {self.n_items:,} (the catalogue's size), got {k}")

    def prepare(self, user: str | None, raw_items: list[str] | None, exclude: list[str], exclude_seen: bool) -> Prepared:
        if raw_items is not None and not raw_items:
            raise BadRequest("items: the session is empty; give at least one item, or leave items out to use the user's logged session")
        if user is None and raw_items is None:
            raise BadRequest("give a user, items (the current session), or both")
        session = self.item_ids(raw_items, "items")[-self.max_session:] if raw_items is not None else None
        excluded = self.item_ids(exclude, "exclude")
        user_id = self.user_id.get(user) if user is not None else None
        features = self.catalogue.long_features
        if user_id is None:
            unknown = f"unknown user {user!r}" if user is not None else "no user"
            if session is None:
                return Prepared(None, excluded, user, False, "popularity", f"{unknown}: the most popular items")
            fallback = f"{unknown}: ranked from the session alone (no profile or long-term history)" if user is not None else None
            row = self.row(session, 0, [0] * len(self.catalogue.profile_fields), {f: [] for f in features})
            return Prepared(row, excluded + (session if exclude_seen else []), user, False, "session-only", fallback)

        users = self.users
        seen = np.unique(users.event_items[user_id]).tolist() if exclude_seen else []
        profile = users.profile[user_id].tolist()
        if session is None:
            if not users.has_session[user_id]:
                return Prepared(None, excluded + seen, user, True, "popularity", f"user {user!r} has no logged session: the most popular items")
            sets = {f: users.long_term[f][user_id].tolist() for f in features}
            row = self.row(users.session[user_id].tolist(), user_id, profile, sets)
            return Prepared(row, excluded + seen, user, True, "latest-session", None)
        times = users.event_times[user_id]
        reference = int(times.max()) if len(times) else 0
        sets = long_term_sets(users.event_items[user_id], times, self.item_side, features, reference, self.long_window_ms, self.max_long)
        row = self.row(session, user_id, profile, sets)
        return Prepared(row, excluded + seen + (session if exclude_seen else []), user, True, "request-session", None)

    def row(self, session: list[int], user: int, profile: list[int], sets: dict[str, list[int]]) -> Batch:
        return {
            "items": torch.tensor([session], dtype=torch.long),
            "lengths": torch.tensor([len(session)], dtype=torch.long),
            "profile": torch.tensor([profile], dtype=torch.long).reshape(1, len(profile)),
            "user": torch.tensor([user], dtype=torch.long),
            **{f"long_{f}": torch.tensor([values or [0]], dtype=torch.long) for f, values in sets.items()},
        }

    def answer(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers to requests {user, items, k, exclude, exclude_seen}, all ranked in one pass."""
        prepared = []
        for position, request in enumerate(requests):
            try:
                self.check_k(request["k"])
                exclude_seen = self.exclude_seen if request["exclude_seen"] is None else request["exclude_seen"]
                prepared.append(self.prepare(request["user"], request["items"], request["exclude"], exclude_seen))
            except BadRequest as error:
                raise BadRequest(f"requests[{position}]: {error}" if len(requests) > 1 else str(error)) from None
        k = max(request["k"] for request in requests)
        modelled = [p for p in prepared if p.row is not None]
        ranked: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if modelled:
            scores, ids = self.rank(stack_rows([p.row for p in modelled]), k, [p.exclude for p in modelled])
            positions = [i for i, p in enumerate(prepared) if p.row is not None]
            ranked = {i: (scores[j].numpy(), ids[j].numpy()) for j, i in enumerate(positions)}
        answers = []
        for i, (request, p) in enumerate(zip(requests, prepared)):
            scores, ids = ranked[i] if i in ranked else self.most_popular(k, p.exclude)
            found = ids >= 0
            answers.append(self.response(p, scores[found][: request["k"]], ids[found][: request["k"]]))
        return answers

    @torch.no_grad()
    def user_vectors(self, batch: Batch) -> Tensor:
        if self.tower is not None:
            feeds = dict(zip(tower_input_names(self.catalogue.long_features),
                             (t.numpy() for t in tower_arguments(batch, self.catalogue.long_features))))
            return torch.from_numpy(self.tower.run(None, feeds)[0])
        return self.model.user_vectors(batch).float()

    def rank(self, batch: Batch, k: int, excluded: list[list[int]]) -> tuple[Tensor, Tensor]:
        from sdm.serving.ann import index_top_k

        exclude = None  # most requests exclude nothing: no exclusion pass then
        if any(excluded):
            lengths = torch.tensor([0, *(len(set(e)) for e in excluded)])
            exclude = (torch.cumsum(lengths, 0), torch.tensor([i for e in excluded for i in sorted(set(e))], dtype=torch.long))
        vectors = self.user_vectors(batch)
        if self.index is None:
            return top_k(vectors, self.item_vectors, k, exclude=exclude)
        return index_top_k(self.index, self.item_vectors, vectors, k, exclude)

    def most_popular(self, k: int, excluded: list[int]) -> tuple[np.ndarray, np.ndarray]:
        skip = set(excluded)
        ids = [int(i) for i in self.popular[: k + len(skip)] if int(i) not in skip][:k]
        return self.item_counts[ids].astype(np.float64), np.array(ids, dtype=np.int64)

    def response(self, prepared: Prepared, scores: np.ndarray, ids: np.ndarray) -> dict[str, Any]:
        # Gathered per column, then zipped: per-item lookups cost more than ranking at top-300.
        features = self.catalogue.side_features
        columns = zip(self.item_raw[ids].tolist(), scores.tolist(), *(self.side_values[f][ids].tolist() for f in features))
        items = [
            {"rank": rank, "item": raw, "score": score, **dict(zip(features, sides))}
            for rank, (raw, score, *sides) in enumerate(columns, start=1)
        ]
        return {
            "user": prepared.user, "known_user": prepared.known_user, "source": prepared.source,
            "fallback": prepared.fallback, "model": self.model_name, "fingerprint": self.fingerprint,
            "index": self.index_kind, "items": items,
        }

    def info(self) -> dict[str, Any]:
        from sdm.serving.ann import index_params

        return {
            "run": str(self.run), "model": self.model_name, "fingerprint": self.fingerprint, "data": str(self.data),
            "dim": int(self.item_vectors.shape[1]), "exclude_seen": self.exclude_seen,
            "catalogue": {"items": self.n_items, "users": len(self.user_id), "side_features": self.catalogue.side_features,
                          "profile_fields": self.catalogue.profile_fields},
            "tower": self.tower_source,
            "index": {"kind": self.index_kind, "source": self.index_source,
                      **({"params": index_params(self.index)} if self.index is not None else {})},
            "user_rows_bytes": self.users.nbytes,
            "limits": {"max_k": self.n_items, "max_batch": MAX_BATCH, "max_ids": MAX_IDS, "max_body_bytes": MAX_BODY_BYTES,
                       "max_session_items": self.max_session},
        }


def stack_rows(rows: list[Batch]) -> Batch:
    """One batch of single-row batches; sessions and sets are 0-padded to the widest."""
    if len(rows) == 1:
        return rows[0]
    stacked = {}
    for name, first in rows[0].items():
        if name in ("items",) or name.startswith("long_"):
            padded = torch.zeros(len(rows), max(row[name].shape[1] for row in rows), dtype=torch.long)
            for i, row in enumerate(rows):
                padded[i, : row[name].shape[1]] = row[name][0]
            stacked[name] = padded
        else:
            stacked[name] = torch.cat([row[name] for row in rows])
    return stacked


# --- HTTP ------------------------------------------------------------------------------------


class RecommendRequest(BaseModel):
    """One request; strict types, so "k": "5" or "user": 7 is an error, not a guess."""

    model_config = ConfigDict(extra="forbid")

    user: Optional[StrictStr] = None
    items: Optional[list[StrictStr]] = Field(None, max_length=MAX_IDS)
    k: StrictInt = DEFAULT_K
    exclude: list[StrictStr] = Field(default_factory=list, max_length=MAX_IDS)
    exclude_seen: Optional[StrictBool] = None  # None: as the run's validation ranked


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH)


def error_response(status: int, message: str) -> Response:
    return Response(json.dumps({"error": " ".join(message.split())}), status_code=status, media_type="application/json")


def describe_invalid(errors: list[dict[str, Any]]) -> str:
    """One line for pydantic's validation errors: where (outside "body") and what, first error first."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    if first["type"] == "missing" and tuple(first["loc"]) == ("body",):
        return "expected a JSON object body"
    where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by their Content-Length or, for chunked
    bodies, as soon as they grow past it; the body read is handed on to the app."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = error_response(413, f"the request body is over {self.limit:,} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body"):
                break
        body, delivered = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="sdm", summary="Top-K items for a user now (SDM)", version=package_version())

    def answered(payload: Any) -> Response:
        # json.dumps directly: FastAPI's generic encoder costs more than the ranking for top-300.
        return Response(json.dumps(payload), media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        if "json" not in request.headers.get("content-type", "json"):
            return error_response(400, f"expected a JSON body (Content-Type: application/json), got {request.headers['content-type']}")
        return error_response(400, describe_invalid(list(error.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        detail = error.detail if error.status_code != 404 else f"no such endpoint: {request.method} {request.url.path}"
        return error_response(error.status_code, str(detail))

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> Response:
        return error_response(400, str(error))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> Response:
        log.exception("request %s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error ({type(error).__name__}); the server log has the details")

    @app.get("/health")
    def health() -> Response:
        return answered({"status": "ok", "fingerprint": service.fingerprint})

    @app.get("/info")
    def info() -> Response:
        return answered(service.info())

    @app.post("/recommend")
    def recommend(request: RecommendRequest) -> Response:
        return answered(service.answer([request.model_dump()])[0])

    @app.post("/recommend/batch")
    def recommend_batch(batch: BatchRequest) -> Response:
        return answered({"answers": service.answer([request.model_dump() for request in batch.requests])})

    app.add_middleware(BodyLimit)
    return app


def app_from_environment() -> FastAPI:
    """The app of one `--workers N` process (uvicorn's factory): each loads its own Service."""
    configure_threads()
    return create_app(Service(Path(os.environ[RUN_ENV]), os.environ.get(INDEX_ENV, "exact")))


def configure_threads() -> None:
    """One thread per request for torch and faiss: concurrent requests share the cores, instead of
    every request's thread pool competing for all of them."""
    torch.set_num_threads(1)
    try:
        import faiss

        faiss.omp_set_num_threads(1)
    except ImportError:
        pass


class StoppingServer(uvicorn.Server):
    """uvicorn re-raises a stop signal once it has shut down; SIGTERM and Ctrl-C are how this
    server is meant to stop, so after the shutdown the command ends normally instead."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that a port in use is one line (and port 0 a free port)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on connections whose socket
        # says TCP, and without it every keep-alive answer (headers, then body) waited ~40 ms for
        # the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except (OSError, OverflowError) as error:
        raise InputError(f"--host {host} --port {port}: cannot listen there ({getattr(error, 'strerror', None) or error})") from None
    sock.set_inheritable(True)
    return sock


def serve(run: Path, host: str, port: int, index: str, workers: int, announce: Any = print) -> None:
    """Serve until SIGTERM or Ctrl-C. With workers > 1, that many processes share the socket."""
    if workers < 1:
        raise InputError("--workers must be at least 1")
    if index not in SERVE_INDEXES:
        raise InputError(f"--index {index!r}: expected one of {', '.join(SERVE_INDEXES)}")
    quiet = {"log_level": "warning", "access_log": False, "timeout_graceful_shutdown": 10}
    if workers == 1:
        service = Service(run, index)
        sock = listening_socket(host, port)
        configure_threads()
        server = StoppingServer(uvicorn.Config(create_app(service), **quiet))
        where = f"http://{host}:{sock.getsockname()[1]}"
        announce(f"serving {run} ({service.model_name}, {service.n_items:,} items, index {index}) on {where}")
        server.run(sockets=[sock])
    else:
        from uvicorn.supervisors import Multiprocess

        from sdm.training.checkpoint import BEST, read_run_config

        read_run_config(run)  # each worker loads the run; a bad one fails here, once, in one line
        if not (run / BEST).is_file():
            raise InputError(f"{run}: no {BEST}; train the run first")
        sock = listening_socket(host, port)
        os.environ[RUN_ENV], os.environ[INDEX_ENV] = str(run), index
        config = uvicorn.Config("sdm.serving.server:app_from_environment", factory=True, workers=workers, **quiet)
        announce(f"serving {run} with {workers} processes (index {index}) on http://{host}:{sock.getsockname()[1]}")
        Multiprocess(config, sockets=[sock]).run()
    announce("stopped")
