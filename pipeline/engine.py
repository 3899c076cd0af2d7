"""`sdm preprocess --engine dask`: the global step and every user bucket as tasks of Dask distributed.

The engine schedules; our code only builds. The driver (the `sdm` process) holds OUT's lock,
submits the global step as one task (Plan.global_step), then one task per user bucket
(run.build_bucket: the bucket's parts of the three per-user stages, each written atomically by
cache.build_stage), and once every bucket is done publishes the stages from the parts as any run
with several buckets does (run.publish_stages: hard links and the stage manifests).

Where a task runs is the engine's choice. A task that raises is retried (RETRIES times); one whose
worker dies is rescheduled on another by the scheduler (up to its `allowed-failures`, 3 by
default). A task killed mid-write leaves only a hidden temporary directory, which the retry's
build_stage removes before it writes again, so a part is complete or absent; the parts the dead
task had finished are cached and reused. Bad input (InputError) is the data's fault and would fail
on every retry: a task returns it instead of raising it, and the driver raises it.

The bucket locks stay (a task takes its bucket's lock, as a `--bucket K/N` job does), but they are
not the scheduler: they only keep this run and another scheduler's bucket job of the same OUT
off one part directory. Workers read the inputs and write OUT at the paths the driver gives them,
made absolute: the workers of an existing cluster (`--address`) must see those paths (a shared
file system), as bucket jobs on several machines must.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.buckets import Layout
from pipeline.config import PreprocessConfig
from pipeline.errors import InputError
from pipeline.run import Plan, StageCallback, StageReport, build_bucket, choose_layout, input_fingerprints, publish_stages

if TYPE_CHECKING:
    from distributed import Client, Future

ENGINES = ("dask",)
INSTALL_HINT = 'pip install "sdm[dask]"'
RETRIES = 3
CONNECT_TIMEOUT = "10s"

BucketBuilder = Callable[[Plan, int, bool], list[StageReport]]
Result = TypeVar("Result")


@dataclass(frozen=True)
class EngineOptions:
    name: str = "dask"
    address: str | None = None  # the scheduler of a running cluster, e.g. tcp://10.0.0.5:8786; None: a local cluster
    workers: int | None = None  # worker processes of the local cluster; None: one per core
    build_bucket: BucketBuilder = build_bucket  # the task of one bucket (a test injects one that dies once)


def check_engine(options: EngineOptions, config: PreprocessConfig, bucket: tuple[int, int] | None) -> None:
    """Refuse, in one line, what cannot run on the engine, before anything is written."""
    if options.name not in ENGINES:
        raise InputError(f"--engine {options.name!r}: expected one of {', '.join(ENGINES)}")
    if bucket is not None:
        raise InputError("--bucket K/N is one job of another scheduler, --engine schedules every bucket itself: use one of them")
    if config.buckets == 1:
        raise InputError("--engine runs user buckets as tasks: use --buckets 2 or more, or leave out --engine for the in-memory path")
    if options.address is not None and options.workers is not None:
        raise InputError("--workers sizes a local cluster; the cluster at --address has its own workers")
    if options.workers is not None and not 1 <= options.workers <= local_cores():
        # each worker is a process whose Polars already uses every core: more would only share them
        raise InputError(f"--workers must be from 1 to the {local_cores()} cores of this machine")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise InputError(f"--engine dask needs Dask distributed, which is not installed: {INSTALL_HINT}") from None


def local_cores() -> int:
    return os.cpu_count() or 1


def run_on_engine(
    config: PreprocessConfig, options: EngineOptions, force: bool, on_stage_start: StageCallback | None
) -> list[StageReport]:
    """The global step and every bucket as tasks, then the per-user stages published here.
    Reports: events, one for the buckets (engine, slots, buckets built), sessions, long_term, splits."""
    config = with_absolute_paths(config)
    inputs = input_fingerprints(config)
    with dask_client(options) as client:
        slots = max(1, sum(client.nthreads().values()))  # tasks that run at once: one per worker thread
        plan = Plan(config, engine_layout(config, inputs, slots), inputs)
        if on_stage_start is not None:
            on_stage_start("global step")
        reports = result_of(submit(client, plan.global_step, force, None))
        if on_stage_start is not None:
            on_stage_start(f"{plan.layout.n_buckets} buckets")
        started = time.perf_counter()
        buckets = [submit(client, options.build_bucket, plan, bucket, force) for bucket in range(plan.layout.n_buckets)]
        parts = [result_of(future) for future in buckets]
        seconds = time.perf_counter() - started
    built = sum(not all(part.cached for part in bucket_parts) for bucket_parts in parts)
    stats = {"engine": options.name, "slots": slots, "buckets": plan.layout.n_buckets, "buckets_built": built}
    reports.append(StageReport("buckets", built == 0, 0.0 if built == 0 else seconds, stats))
    return reports + publish_stages(plan, force, on_stage_start, parts_built=True)


def with_absolute_paths(config: PreprocessConfig) -> PreprocessConfig:
    """The same run with absolute paths: a worker's working directory is not the driver's."""
    absolute = {name: getattr(config, name).absolute() for name in ("logs", "out", "items", "users") if getattr(config, name) is not None}
    return replace(config, **absolute)


def engine_layout(config: PreprocessConfig, inputs: dict[str, Any], slots: int) -> Layout:
    """--buckets, else the memory rule with the limit shared by the `slots` buckets built at once,
    and at least one bucket per slot (and two: one bucket is the in-memory path, not tasks)."""
    layout = choose_layout(config, config.out, inputs, concurrent=slots)
    if config.buckets is not None:
        return layout
    return replace(layout, n_buckets=max(layout.n_buckets, slots, 2))


@contextmanager
def dask_client(options: EngineOptions) -> Iterator[Client]:
    """A client of the cluster at --address, or of a local cluster closed on the way out. Local
    workers are processes with one thread each: a bucket build is Polars, which uses the cores
    itself, and a process per worker is what a killed or crashed build takes down alone."""
    from distributed import Client, LocalCluster

    if options.address is not None:
        try:
            client = Client(options.address, timeout=CONNECT_TIMEOUT)
        except (OSError, ValueError) as error:  # nothing listening there; not an address at all
            raise InputError(f"--address {options.address!r}: no Dask scheduler answers there ({error})") from None
        with client:
            yield client
        return
    workers = options.workers or local_cores()
    with warnings.catch_warnings():
        # its scheduler's HTTP server (health, metrics) takes another port when 8787 is busy, and says so
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    with cluster, Client(cluster) as client:
        yield client


def submit(client: Client, task: Callable[..., Result], *args: Any) -> Future:
    """`task(*args)` on the cluster, retried on failure; pure=False: never deduplicated against an
    earlier run's result, the files on disk are what decides what is cached."""
    return client.submit(returning_input_errors, task, *args, retries=RETRIES, pure=False)


def returning_input_errors(task: Callable[..., Result], *args: Any) -> Result | InputError:
    """Runs on a worker: bad input comes back as a value, so that the engine does not retry it."""
    try:
        return task(*args)
    except InputError as error:
        return error


def result_of(future: Future) -> Any:
    result = future.result()
    if isinstance(result, InputError):
        raise result
    return result
