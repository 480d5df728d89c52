"""Latency of the analysts' Query service under concurrent load, against gRPC's own floor.

    python -m benchmarks.query --json OUT [--releases 200] [--analysts 50] [--seconds 20]
        [--think-ms 100] [--saturation-seconds 10] [--client-processes 2]
        [--profile-seconds 5]

The coordinator's gRPC services (:func:`server.grpc_server.serve` with the real
:class:`server.aggregation.Aggregator` and :class:`server.aggregation.QueryHandler`, its
default thread pool) run in a process of their own, over a SQLite store in a temporary
directory, with access control on as ``fedlens server`` runs by default (``--auth
token``): :class:`server.access.AccessControl` with its default rate limit (50 calls/s,
burst 100, per token) and token cache. Before it starts, ``--releases`` releases are
written to that store with :meth:`server.storage.Store.save_release`, each shaped like a
``feature_stats`` release of the Adult data: 100 released values, 24 grouped values, the
costs of 4 sites and a few parameters, each behind a completed round; and each analyst
is issued a ``viewer`` token of its own (the least role that reads releases).

``--analysts`` analysts then run for ``--seconds`` seconds, spread over
``--client-processes`` processes (threads within each, so the load generator neither
shares the server's GIL nor puts all analysts behind one). Each analyst has its own
:class:`fedlens.query_client.QueryClient` presenting its token, and its own channel to
the health service, and loops over: ``ListReleases`` (limit 20), ``GetRelease`` of a
stored id drawn at random, and the gRPC health ``Check``. Every call's wall-clock latency
is recorded as the analyst sees it, decoding into fedlens types included; a call that
raises (before the clock starts too) is an error.

**Load model.** After every call the analyst pauses for a time drawn from an exponential
distribution of mean ``--think-ms`` (100 ms by default): it reads the answer before it
asks again. 100 ms is far shorter than a person reading a release; it stands for a
scripted analyst or a dashboard fetching a page's releases, so each analyst still offers
about 10 calls per second. The headline ``p50_ms``, ``p99_ms`` and ``rps`` are measured
under this load. A closed loop with no think time measures something else: on 2 cores it
saturates the machine, and then every analyst always has one call in flight, so by
Little's law the mean latency is just analysts / throughput whatever the server does.
That run follows for ``--saturation-seconds`` and is reported under ``saturation``
(its Query ``rps``, ``p50_ms`` and ``p99_ms``, with ``littles_law_mean_ms`` beside the
measured mean of all calls); there, an analyst faster than 50 calls/s meets the rate
limit, whose refusals are errors counted apart as ``rate_limited``.

The health check is the **baseline**: a call that does no work in the server, on the
same channels, threads and load, and not behind a token (health is open). It waits for
the same pool of server worker threads as the Query calls, so under load it measures gRPC
plus that queue, and ``p99_ratio_to_health`` says how far the Query calls are above it.
Right after, the same analysts call health alone for ``min(seconds, 5)`` seconds with the
same think time (``health_only``): gRPC's own cost under this load on this machine, with
no Query work in the server, against which ``p99_ratio_to_health_only`` compares the
Query calls. ``calls``, ``p50_ms``, ``p99_ms`` and ``rps`` at the top level cover the
Query calls (``ListReleases`` and ``GetRelease``) only; ``per_call`` has every call type,
health included. The issue's target is ``p99_ms <= 20`` with no errors (``target_met``).
The server also reports how long its Query handlers took (wall clock, from the servicer
method's entry to its return, after the token check), which separates handler time from
authentication, queueing for one of the server's worker threads and transport.

Everything shares the machine's cores (``cores`` in the output) with the load generator,
as an analyst's client on the same host would, and with whatever else runs on the host:
the load averages before and after are recorded (``load_average_before``,
``load_average_after``; ``load_average_1min`` is the latter's first), and the CPU that
each side used during the measured seconds is reported (``cores_busy``). When the target
is missed, the same load runs again for ``--profile-seconds`` with every Query handler
thread under cProfile (CPU time of the thread, merged over threads); the functions with
the most own time and the server process's CPU use are reported under ``profile``.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import inspect
import io
import json
import logging
import multiprocessing as mp
import os
import pstats
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlens.channels import open_channel
from fedlens.query_client import QueryClient
from fedlens.types import PrivacyCost, Release, ReleasedValue, RoundSpec

__all__ = ["main", "percentile", "run_benchmark"]

logger = logging.getLogger(__name__)

#: The issue's target for the Query calls.
TARGET_P99_MS = 20.0
LIST_LIMIT = 20
CALLS = ("ListReleases", "GetRelease", "grpc_health")
QUERY_CALLS = CALLS[:2]
SITES = ("site-a", "site-b", "site-c", "site-d")
VALUES_PER_RELEASE = 100
GROUPED_PER_RELEASE = 24
PROFILE_TOP = 15
HEALTH_ONLY_SECONDS = 5.0
#: Mean pause of an analyst after each call (exponential), in milliseconds.
DEFAULT_THINK_MS = 100.0
DEFAULT_SATURATION_SECONDS = 10.0


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation; NaN when empty."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- releases --------------------------------------------------------------------------


def make_release(index: int, rng: random.Random, created_at: datetime) -> Release:
    """A release shaped like a ``feature_stats`` release of Adult, behind round ``index``."""
    features = [f"feature_{i:02d}" for i in range(VALUES_PER_RELEASE // 4)]
    values = tuple(
        ReleasedValue(f"{name}.{stat}", rng.gauss(0.0, 10.0), rng.uniform(0.01, 1.0))
        for name in features
        for stat in ("mean", "var", "p10", "p90")
    )
    grouped = tuple(
        ReleasedValue(f"sex={s}|income={y}|{m}", rng.gauss(0.0, 1.0), rng.uniform(0.01, 1.0))
        for s in ("female", "male")
        for y in ("<=50K", ">50K")
        for m in ("count", "rate", "mean_age", "mean_hours", "tpr", "fpr")
    )
    epsilon = rng.choice((0.25, 0.5, 1.0))
    costs = tuple(PrivacyCost(site, epsilon, 1e-6, epsilon * (index + 1) / 10) for site in SITES)
    return Release(
        release_id=f"release-{index:05d}",
        round_id=f"round-{index:05d}",
        kind="feature_stats",
        created_at=created_at.isoformat(),
        noised_count=rng.uniform(5_000, 40_000),
        values=values,
        grouped=grouped,
        costs=costs,
        params={"dataset": "adult", "epsilon": str(epsilon), "delta": "1e-06", "clip": "1.0"},
    )


def issue_tokens(db: Path, count: int) -> list[str]:
    """One viewer token for each of ``count`` analysts, as ``fedlens admin token issue``
    would give them (viewer is the least role that reads releases)."""
    from server.access import AccessControl, Role
    from server.storage import Store

    store = Store(f"sqlite:///{db}")
    try:
        access = AccessControl(store)
        now = datetime(2026, 1, 1, tzinfo=UTC)
        return [access.issue(f"analyst-{a:03d}", Role.VIEWER, now=now)[1] for a in range(count)]
    finally:
        store.close()


def store_releases(db: Path, count: int, *, seed: int = 0) -> list[str]:
    """Write ``count`` releases, each behind a completed round, and return their ids."""
    from server.storage import Store  # the store pulls in torch; analysts never need it

    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    store = Store(f"sqlite:///{db}")
    try:
        ids = []
        for index in range(count):
            at = start + timedelta(hours=index)
            release = make_release(index, rng, at)
            spec = RoundSpec(
                round_id=release.round_id,
                kind=release.kind,
                site_ids=SITES,
                length=VALUES_PER_RELEASE + 1,
                bits=32,
                scale=1e5,
                clip_bound=1.0,
                labels=tuple(v.name for v in release.values),
            )
            store.save_round(spec, "complete", now=at)
            store.save_release(release, created_at=at)
            ids.append(release.release_id)
        return ids
    finally:
        store.close()


# -- server process --------------------------------------------------------------------


@dataclass
class _HandlerStats:
    """Wall time of every Query handler call and, while enabled, one cProfile per thread."""

    durations: dict[str, list[float]] = field(default_factory=dict)
    profiling: bool = False
    profiles: list[cProfile.Profile] = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)
    lock: threading.Lock = field(default_factory=threading.Lock)
    cumulative: dict[str, float] = field(default_factory=dict)

    def wrap(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        samples = self.durations.setdefault(name, [])

        @functools.wraps(method)
        def timed(*args: Any, **kwargs: Any) -> Any:
            profile = self._profile() if self.profiling else None
            start = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                return method(*args, **kwargs)
            finally:
                if profile is not None:
                    profile.disable()
                samples.append(time.perf_counter() - start)

        return timed

    def _profile(self) -> cProfile.Profile:
        profile: cProfile.Profile | None = getattr(self.local, "profile", None)
        if profile is None:
            profile = self.local.profile = cProfile.Profile(time.thread_time)
            with self.lock:
                self.profiles.append(profile)
        return profile

    def reset(self) -> None:
        for samples in self.durations.values():
            samples.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            name: {
                "calls": len(s),
                "p50_ms": percentile(s, 50) * 1e3,
                "p99_ms": percentile(s, 99) * 1e3,
            }
            for name, s in self.durations.items()
        }

    def top_functions(self) -> tuple[list[dict[str, Any]], float]:
        """The functions with the most own time, and the own time of all of them."""
        with self.lock:
            if not self.profiles:
                return [], 0.0
            stats = pstats.Stats(self.profiles[0], stream=io.StringIO())
            for profile in self.profiles[1:]:
                stats.add(profile)
        rows = []
        for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append(
                {
                    "function": f"{_short(filename)}:{line}({function})",
                    "calls": calls,
                    "own_s": own,
                    "cumulative_s": cumulative,
                }
            )
        rows.sort(key=lambda r: r["own_s"], reverse=True)
        self.cumulative = {
            function: cumulative
            for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items()  # type: ignore[attr-defined]
            if function in QUERY_CALLS and filename.endswith("grpc_server.py")
        }
        return rows[:PROFILE_TOP], sum(r["own_s"] for r in rows)


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/lib/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    root = str(Path(__file__).resolve().parents[1]) + "/"
    return filename.removeprefix(root)


def _server_main(conn: Connection, db: str) -> None:
    """Serve over the store at ``db``; answer ``window``, ``stats`` and ``stop`` on ``conn``.

    ``("window", start, stop, profile)`` measures the server's CPU time and its handlers
    (under cProfile if ``profile``) from the wall-clock time ``start`` to ``stop``.
    """
    logging.basicConfig(level=logging.WARNING)
    from server import grpc_server
    from server.access import AccessControl
    from server.aggregation import Aggregator, QueryHandler
    from server.storage import Store

    handlers = _HandlerStats()
    for name in QUERY_CALLS:
        method = getattr(grpc_server.QueryServicer, name)
        setattr(grpc_server.QueryServicer, name, handlers.wrap(name, method))
    store = Store(f"sqlite:///{db}")
    # As `fedlens server` runs by default (--auth token): its defaults for rates and caches.
    access = AccessControl(store)
    running = grpc_server.serve(Aggregator(store), QueryHandler(store), access=access)
    conn.send(running.address)
    cpu = [0.0, 0.0]
    sampler = threading.Thread()

    def measure(start: float, stop: float, profile: bool) -> None:
        time.sleep(max(0.0, start - time.time()))
        handlers.reset()  # drops the analysts' warm-up calls
        handlers.profiling = profile
        cpu[0] = time.process_time()
        time.sleep(max(0.0, stop - time.time()))
        cpu[1] = time.process_time()
        handlers.profiling = False

    while True:
        command, *arguments = conn.recv()
        if command == "window":
            start, stop, profile = arguments
            sampler = threading.Thread(target=measure, args=(start, stop, profile))
            sampler.start()
            conn.send(None)
        elif command == "stats":
            sampler.join()
            wall = stop - start
            top, handler_cpu = handlers.top_functions()
            conn.send(
                {
                    "handlers": handlers.summary(),
                    "cpu_s": cpu[1] - cpu[0],
                    "wall_s": wall,
                    "top_own_time": top,
                    "handler_cpu_s": handler_cpu,
                    "handlers_cumulative": handlers.cumulative,
                    "max_workers": inspect.signature(grpc_server.serve)
                    .parameters["max_workers"]
                    .default,
                }
            )
        else:
            running.stop(None)
            store.close()
            conn.send(None)
            return


class _ServerProcess:
    def __init__(self, db: Path) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_server_main, args=(child, str(db)), daemon=True)
        self._process.start()
        self.address = str(self._ask(None, 120.0))

    def _ask(self, command: tuple[Any, ...] | None, timeout: float = 60.0) -> Any:
        if command is not None:
            self._conn.send(command)
        if not self._conn.poll(timeout):
            raise RuntimeError(f"the server process did not answer {command!r} in {timeout:.0f}s")
        return self._conn.recv()

    def window(self, start: float, stop: float, *, profile: bool = False) -> None:
        """Measure the server from the wall-clock time ``start`` to ``stop``."""
        self._ask(("window", start, stop, profile))

    def stats(self) -> dict[str, Any]:
        """What the server measured in the last window (once it has ended)."""
        stats: dict[str, Any] = self._ask(("stats",))
        return stats

    def stop(self) -> None:
        try:
            self._ask(("stop",))
        finally:
            self._process.join(10.0)
            if self._process.is_alive():
                self._process.terminate()


# -- load generator --------------------------------------------------------------------


def _analyst(
    address: str,
    release_ids: Sequence[str],
    seed: int,
    token: str,
    think_s: float,
    mix: Sequence[str],
    start_at: float,
    stop_at: float,
    out: dict[str, list[float]],
    errors: list[str],
) -> None:
    rng = random.Random(seed)
    pauses = random.Random(seed + 7_919)  # think times, apart from the releases chosen
    channel = open_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="")
    with QueryClient(address, token=token) as client:
        every: dict[str, Callable[[], object]] = {
            "ListReleases": lambda: client.list_releases(limit=LIST_LIMIT),
            "GetRelease": lambda: client.get_release(rng.choice(release_ids)),
            "grpc_health": lambda: health.Check(request, timeout=10.0),
        }
        calls = {name: every[name] for name in mix}
        for name, call in calls.items():  # connect before the clock starts
            try:
                call()
            except (grpc.RpcError, Exception) as exc:  # counted, as in the measured loop
                errors.append(f"{name} (before the start): {type(exc).__name__}: {exc}")
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            for name, call in calls.items():
                began = time.perf_counter()
                try:
                    call()
                except (grpc.RpcError, Exception) as exc:  # every failure counts
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                else:
                    out[name].append(time.perf_counter() - began)
                if think_s > 0:  # the analyst reads the answer before the next call
                    pause = pauses.expovariate(1.0 / think_s)
                    time.sleep(max(0.0, min(pause, stop_at - time.time())))
    channel.close()


def _client_main(
    conn: Connection,
    address: str,
    release_ids: list[str],
    analysts: list[tuple[int, str]],
    think_s: float,
    mix: tuple[str, ...],
    start_at: float,
    stop_at: float,
) -> None:
    results: list[dict[str, list[float]]] = [{name: [] for name in CALLS} for _ in analysts]
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=_analyst,
            args=(
                address, release_ids, seed, token, think_s, mix, start_at, stop_at, out, errors
            ),
            daemon=True,
        )
        for (seed, token), out in zip(analysts, results, strict=True)
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = time.process_time()
    for thread in threads:
        thread.join()
    cpu = time.process_time() - cpu0
    merged = {name: [x for r in results for x in r[name]] for name in CALLS}
    conn.send({"latencies": merged, "errors": errors, "cpu_s": cpu})


def generate_load(
    address: str,
    release_ids: list[str],
    tokens: Sequence[str],
    *,
    analysts: int,
    seconds: float,
    processes: int,
    seed: int,
    think_s: float = 0.0,
    mix: tuple[str, ...] = CALLS,
    on_window: Callable[[float, float], None] | None = None,
) -> tuple[dict[str, list[float]], list[str], float]:
    """Run the analysts, analyst ``a`` with ``tokens[a]``, each looping over the calls
    ``mix`` with a pause drawn from an exponential of mean ``think_s`` after every call (none
    if 0: a closed loop); return every call's latency (seconds) by call type, the errors,
    and the CPU seconds the load generator used."""
    ctx = mp.get_context("spawn")
    processes = max(1, min(processes, analysts))
    # Start once every process has had time to spawn and connect its analysts.
    start_at = time.time() + 1.0 + 0.04 * analysts
    stop_at = start_at + seconds
    if on_window is not None:
        on_window(start_at, stop_at)
    pipes, workers = [], []
    for p in range(processes):
        parent, child = ctx.Pipe()
        mine = [(seed * 100_000 + a, tokens[a]) for a in range(p, analysts, processes)]
        worker = ctx.Process(
            target=_client_main,
            args=(child, address, release_ids, mine, think_s, mix, start_at, stop_at),
            daemon=True,
        )
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    latencies: dict[str, list[float]] = {name: [] for name in CALLS}
    errors: list[str] = []
    cpu = 0.0
    for parent, worker in zip(pipes, workers, strict=True):
        if not parent.poll(stop_at - time.time() + 120.0):
            worker.terminate()
            errors.append("a load-generating process did not report")
            continue
        report = parent.recv()
        for name in CALLS:
            latencies[name].extend(report["latencies"][name])
        errors.extend(report["errors"])
        cpu += report["cpu_s"]
        worker.join(10.0)
    return latencies, errors, cpu


# -- the benchmark ---------------------------------------------------------------------


def _summary(samples: Sequence[float], seconds: float) -> dict[str, float]:
    return {
        "calls": len(samples),
        "p50_ms": percentile(samples, 50) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "max_ms": max(samples, default=float("nan")) * 1e3,
        "rps": len(samples) / seconds,
    }


def _rate_limited(errors: Sequence[str]) -> int:
    """How many errors are the per-token rate limit's refusals (RESOURCE_EXHAUSTED)."""
    return sum("over its rate limit" in e for e in errors)


def _saturation(
    latencies: dict[str, list[float]],
    errors: list[str],
    client_cpu: float,
    server_stats: dict[str, Any],
    *,
    analysts: int,
    seconds: float,
) -> dict[str, Any]:
    """The closed loop's figures, with what Little's law predicts from its throughput."""
    query = [x for name in QUERY_CALLS for x in latencies[name]]
    every = [x for name in CALLS for x in latencies[name]]
    throughput = len(every) / seconds
    return {
        "seconds": seconds,
        "think_ms": 0.0,
        "calls": len(query),
        "errors": len(errors),
        "rate_limited": _rate_limited(errors),
        "error_samples": sorted(set(errors))[:5],
        "p50_ms": percentile(query, 50) * 1e3,
        "p99_ms": percentile(query, 99) * 1e3,
        "rps": len(query) / seconds,
        "per_call": {name: _summary(latencies[name], seconds) for name in CALLS},
        # Little's law with no think time: each analyst always has one call in flight, so
        # the mean latency of all calls is analysts / throughput, whatever the server does.
        "mean_ms_all_calls": sum(every) / len(every) * 1e3 if every else float("nan"),
        "littles_law_mean_ms": analysts / throughput * 1e3 if throughput else float("nan"),
        "server_cores_busy": server_stats["cpu_s"] / server_stats["wall_s"],
        "load_generator_cores_busy": client_cpu / seconds,
    }


def run_benchmark(
    *,
    releases: int,
    analysts: int,
    seconds: float,
    client_processes: int,
    profile_seconds: float,
    think_ms: float = DEFAULT_THINK_MS,
    saturation_seconds: float = DEFAULT_SATURATION_SECONDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Store the releases, start the server, load it, and return the report."""
    began = time.perf_counter()
    load_before = os.getloadavg()
    think_s = think_ms / 1e3
    with tempfile.TemporaryDirectory(prefix="fedlens-query-") as tmp:
        db = Path(tmp) / "fedlens.db"
        release_ids = store_releases(db, releases, seed=seed)
        tokens = issue_tokens(db, analysts)
        server = _ServerProcess(db)
        try:
            load = functools.partial(
                generate_load,
                server.address,
                release_ids,
                tokens,
                analysts=analysts,
                processes=client_processes,
                seed=seed,
            )
            latencies, errors, client_cpu = load(
                seconds=seconds, think_s=think_s, on_window=server.window
            )
            server_stats = server.stats()
            # gRPC's floor under the same load model: the analysts call health alone.
            health_seconds = min(seconds, HEALTH_ONLY_SECONDS)
            health_only, health_errors, health_client_cpu = load(
                seconds=health_seconds,
                think_s=think_s,
                mix=("grpc_health",),
                on_window=server.window,
            )
            health_server = server.stats()
            saturation: dict[str, Any] | None = None
            if saturation_seconds > 0:
                logger.info("closed loop (no think time) for %.0f s", saturation_seconds)
                closed, closed_errors, closed_cpu = load(
                    seconds=saturation_seconds, seed=seed + 2, on_window=server.window
                )
                saturation = _saturation(
                    closed,
                    closed_errors,
                    closed_cpu,
                    server.stats(),
                    analysts=analysts,
                    seconds=saturation_seconds,
                )
            query = [x for name in QUERY_CALLS for x in latencies[name]]
            p99 = percentile(query, 99) * 1e3
            target_met = p99 <= TARGET_P99_MS and not errors
            profile: dict[str, Any] | None = None
            if not target_met and profile_seconds > 0:
                logger.info("target missed: profiling the server for %.0f s", profile_seconds)
                profiled, _, _ = load(
                    seconds=profile_seconds,
                    think_s=think_s,
                    seed=seed + 1,
                    on_window=functools.partial(server.window, profile=True),
                )
                stats = server.stats()
                profile = {
                    "seconds": profile_seconds,
                    "timer": "thread CPU time of the Query handler threads, merged",
                    "query_p99_ms_while_profiled": percentile(
                        [x for name in QUERY_CALLS for x in profiled[name]], 99
                    )
                    * 1e3,
                    "server_cpu_s": stats["cpu_s"],
                    "server_cores_busy": stats["cpu_s"] / stats["wall_s"],
                    "handler_cpu_s": stats["handler_cpu_s"],
                    "handlers_cumulative_cpu_s": stats["handlers_cumulative"],
                    "top_own_time": stats["top_own_time"],
                }
        finally:
            server.stop()
    per_call = {name: _summary(latencies[name], seconds) for name in CALLS}
    health_p99 = per_call["grpc_health"]["p99_ms"]
    load_after = os.getloadavg()
    return {
        "benchmark": "query",
        "releases": releases,
        "analysts": analysts,
        "client_processes": max(1, min(client_processes, analysts)),
        "seconds": seconds,
        "think_ms": think_ms,
        "load_model": (
            "each analyst pauses after every call for an exponential time of mean think_ms "
            "(closed loop with think time); 'saturation' is the same analysts with none"
        ),
        "auth": {
            "mode": "token",
            "role": "viewer",
            "tokens": "one per analyst",
            "rate_limit": "server defaults (50 calls/s, burst 100, per token)",
        },
        "cores": os.cpu_count(),
        "load_average_1min": load_after[0],
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "server_max_workers": server_stats["max_workers"],
        "list_limit": LIST_LIMIT,
        "calls": len(query),
        "errors": len(errors),
        "rate_limited": _rate_limited(errors),
        "error_samples": sorted(set(errors))[:5],
        "p50_ms": percentile(query, 50) * 1e3,
        "p99_ms": p99,
        "max_ms": max(query, default=float("nan")) * 1e3,
        "rps": len(query) / seconds,
        "per_call": per_call,
        "baseline": "grpc_health",
        "p99_ratio_to_health": p99 / health_p99 if health_p99 > 0 else float("nan"),
        "p50_ratio_to_health": (percentile(query, 50) * 1e3) / per_call["grpc_health"]["p50_ms"],
        "health_only": {
            "seconds": health_seconds,
            "think_ms": think_ms,
            "errors": len(health_errors),
            **_summary(health_only["grpc_health"], health_seconds),
            "server_cores_busy": health_server["cpu_s"] / health_server["wall_s"],
            "load_generator_cores_busy": health_client_cpu / health_seconds,
        },
        "p99_ratio_to_health_only": p99 / (percentile(health_only["grpc_health"], 99) * 1e3),
        "server": {
            "handler_wall": server_stats["handlers"],
            "cpu_s": server_stats["cpu_s"],
            "cores_busy": server_stats["cpu_s"] / server_stats["wall_s"],
        },
        "load_generator_cores_busy": client_cpu / seconds,
        "saturation": saturation,
        "target": {"p99_ms": TARGET_P99_MS, "errors": 0, "think_ms": think_ms},
        "target_met": target_met,
        "profile": profile,
        "total_seconds": time.perf_counter() - began,
    }


def _row(name: str, row: dict[str, Any]) -> str:
    return (
        f"{name:<14}{row['calls']:>9}{row['rps']:>9.0f}{row['p50_ms']:>9.2f}"
        f"{row['p99_ms']:>9.2f}{row['max_ms']:>9.1f}"
    )


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"{results['analysts']} analysts (viewer tokens), {results['releases']} releases, "
        f"{results['seconds']:.0f} s on {results['cores']} cores, think time "
        f"{results['think_ms']:g} ms (exponential mean); load average "
        f"{results['load_average_before'][0]:.2f} before, {results['load_average_after'][0]:.2f} "
        "after",
        f"{'call':<14}{'calls':>9}{'rps':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for name, row in results["per_call"].items():
        lines.append(_row(name, row))
    lines.append(_row("Query calls", results))
    lines.append(_row("health alone", results["health_only"]))
    lines.append(
        f"Query p99 / health p99: {results['p99_ratio_to_health']:.2f} under the same load, "
        f"{results['p99_ratio_to_health_only']:.2f} against health alone; "
        f"errors: {results['errors']}"
    )
    lines.append(
        f"cores busy: server {results['server']['cores_busy']:.2f}, "
        f"load generator {results['load_generator_cores_busy']:.2f}"
    )
    for name, row in results["server"]["handler_wall"].items():
        lines.append(
            f"server handler {name}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms"
        )
    saturation = results["saturation"]
    if saturation:
        lines.append(
            f"saturation (no think time, {saturation['seconds']:.0f} s): "
            f"{saturation['rps']:.0f} Query rps, p50 {saturation['p50_ms']:.2f} ms, "
            f"p99 {saturation['p99_ms']:.2f} ms, errors {saturation['errors']} "
            f"({saturation['rate_limited']} rate-limited); mean latency "
            f"{saturation['mean_ms_all_calls']:.2f} ms vs Little's law "
            f"{saturation['littles_law_mean_ms']:.2f} ms; server busy "
            f"{saturation['server_cores_busy']:.2f} cores"
        )
    verdict = "met" if results["target_met"] else "MISSED"
    lines.append(f"target p99 <= {TARGET_P99_MS:.0f} ms with 0 errors: {verdict}")
    profile = results["profile"]
    if profile:
        lines.append(
            f"profile ({profile['seconds']:.0f} s, server busy "
            f"{profile['server_cores_busy']:.2f} cores), most own CPU time:"
        )
        for name, cumulative in profile["handlers_cumulative_cpu_s"].items():
            lines.append(f"  {cumulative:8.3f} s in {name} (cumulative)")
        for row in profile["top_own_time"][:10]:
            lines.append(f"  {row['own_s']:8.3f} s {row['calls']:>8}  {row['function']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--releases", type=int, default=200)
    parser.add_argument("--analysts", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--think-ms",
        type=float,
        default=DEFAULT_THINK_MS,
        help="mean pause after each call (exponential); 0: a closed loop",
    )
    parser.add_argument(
        "--saturation-seconds",
        type=float,
        default=DEFAULT_SATURATION_SECONDS,
        help="length of the closed loop with no think time (0: skip it)",
    )
    parser.add_argument(
        "--client-processes", type=int, default=2, help="processes the analysts are spread over"
    )
    parser.add_argument(
        "--profile-seconds", type=float, default=5.0, help="0: no profile when the target is missed"
    )
    args = parser.parse_args(argv)
    if args.releases < 1 or args.analysts < 1 or args.seconds <= 0:
        parser.error("--releases and --analysts must be >= 1 and --seconds > 0")
    if args.think_ms < 0 or args.saturation_seconds < 0:
        parser.error("--think-ms and --saturation-seconds must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    results = run_benchmark(
        releases=args.releases,
        analysts=args.analysts,
        seconds=args.seconds,
        client_processes=args.client_processes,
        profile_seconds=args.profile_seconds,
        think_ms=args.think_ms,
        saturation_seconds=args.saturation_seconds,
    )
    args.json.write_text(json.dumps(results, indent=2))
    print(format_table(results))


if __name__ == "__main__":
    main()
