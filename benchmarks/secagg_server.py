"""The aggregator's process, and what it measures of itself.

The aggregator, fedlens or plain (:mod:`benchmarks.secagg_plain`), runs in a process of its
own, one per kind for the rounds of one invocation. Over a pipe it answers ``begin`` (just
before ``OpenRound``), ``end`` (once the round is over) and ``stop``. Between ``begin`` and
``end`` it reports its CPU time (``time.process_time``, every thread, gRPC's included), its
resident memory before the round and its peak during the round (``VmHWM`` from
``/proc/self/status``, reset through ``/proc/self/clear_refs`` when the round begins;
``ru_maxrss`` cannot be reset and, for a child started by ``vfork`` + ``exec``, can report
the parent's peak), and the sum the round released.

The fedlens aggregator is the real :class:`server.aggregation.Aggregator` behind
:func:`server.grpc_server.serve` over a SQLite store (journal and audit log included). The
sum it releases is handed to a post-processor registered here under the kind
``benchmark_sum``, which keeps the sum and stores a release with no values. With
``profile``, every gRPC handler thread of the fedlens servicer runs under its own cProfile,
and ``end`` writes the merged profile next to the store.
"""

from __future__ import annotations

import cProfile
import functools
import logging
import multiprocessing as mp
import pstats
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.secagg_plain import start_plain_server
from benchmarks.secagg_setup import KIND
from fedlens.errors import DropoutError, ExplanationError
from fedlens.v1 import aggregation_pb2_grpc

__all__ = ["ServerProcess"]


def _memory_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    return fields


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


class _ThreadProfiles:
    """One cProfile per gRPC handler thread (cProfile sees only the thread it runs in)."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[cProfile.Profile] = []
        self._lock = threading.Lock()

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def profiled(*args: Any, **kwargs: Any) -> Any:
            profile = getattr(self._local, "profile", None)
            if profile is None:
                profile = self._local.profile = cProfile.Profile(time.thread_time)
                with self._lock:
                    self._all.append(profile)
            profile.enable()
            try:
                return method(*args, **kwargs)
            finally:
                profile.disable()

        return profiled

    def dump(self, path: Path) -> None:
        with self._lock:
            stats = pstats.Stats(self._all[0])
            for profile in self._all[1:]:
                stats.add(profile)
        stats.dump_stats(str(path))


def _start_fedlens(
    workdir: Path, profiles: _ThreadProfiles | None
) -> tuple[str, Any, Callable[[str], np.ndarray | None]]:
    # Imported here: the aggregator pulls in torch, which the sites never need.
    from explain import ExplanationKind, PostProcessed, register_kind
    from server import grpc_server
    from server.aggregation import Aggregator, QueryHandler
    from server.storage import Store

    released: dict[str, np.ndarray] = {}

    def postprocess(
        noised_sum: np.ndarray,
        noise_std: float,
        clip_bound: float,
        labels: tuple[str, ...],
        params: Any,
    ) -> PostProcessed:
        # Also called on zeros when the round opens; the release overwrites that.
        released[params["benchmark_round"]] = noised_sum
        return PostProcessed(noised_count=0.0, values=(), grouped=())

    def contribute(*args: Any, **kwargs: Any) -> Any:
        # The benchmark's sites submit prepared vectors; no site computes this kind.
        raise ExplanationError(f"{KIND} has no per-record contribution: its sites send vectors")

    register_kind(ExplanationKind(name=KIND, contribute=contribute, postprocess=postprocess))
    if profiles is not None:
        servicer = grpc_server.AggregationServicer
        for name in dir(aggregation_pb2_grpc.AggregationServicer):
            if not name.startswith("_"):
                setattr(servicer, name, profiles.wrap(getattr(servicer, name)))
    store = Store(f"sqlite:///{workdir / 'fedlens.db'}")
    running = grpc_server.serve(Aggregator(store), QueryHandler(store))
    return running.address, running, released.get


def _server_main(conn: Connection, kind: str, workdir: str, profile: bool) -> None:
    """The aggregator's process: serves, and answers ``begin``/``end``/``stop`` on ``conn``."""
    logging.basicConfig(level=logging.WARNING)
    profiles = _ThreadProfiles() if profile else None
    if kind == "plain":
        address, running, released = start_plain_server()
    else:
        address, running, released = _start_fedlens(Path(workdir), profiles)
    conn.send(address)
    cpu0, rss0, reset = 0.0, 0, False
    while True:
        command, argument = conn.recv()
        if command == "begin":
            reset = _reset_peak()
            rss0 = _memory_kib()["VmRSS"]
            cpu0 = time.process_time()
            conn.send(None)
        elif command == "end":
            cpu = time.process_time() - cpu0
            memory = _memory_kib()
            profile_path = ""
            if profiles is not None:
                profile_path = str(Path(workdir) / f"{argument}.prof")
                profiles.dump(Path(profile_path))
            conn.send(
                {
                    "cpu_s": cpu,
                    "rss_before_mib": rss0 / 1024,
                    "peak_mib": memory["VmHWM"] / 1024,
                    "peak_is_round_peak": reset,
                    "released": released(argument),
                    "profile": profile_path,
                }
            )
        else:
            running.stop(None)
            conn.send(None)
            return


class ServerProcess:
    """An aggregator (fedlens or plain) in a process of its own."""

    def __init__(self, kind: str, workdir: Path, *, profile: bool = False) -> None:
        ctx = mp.get_context("spawn")
        self.kind = kind
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_server_main, args=(child, kind, str(workdir), profile), daemon=True
        )
        self._process.start()
        self._address: str | None = None

    @property
    def address(self) -> str:
        if self._address is None:
            self._address = str(self._receive(300.0))
        return self._address

    def _receive(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise DropoutError(f"the {self.kind} server process did not answer in {timeout:.0f}s")
        return self._conn.recv()

    def begin(self) -> None:
        self._conn.send(("begin", ""))
        self._receive(60.0)

    def end(self, round_id: str) -> dict[str, Any]:
        self._conn.send(("end", round_id))
        report: dict[str, Any] = self._receive(300.0)
        return report

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                self._conn.send(("stop", ""))
                self._receive(30.0)
            except (OSError, EOFError, DropoutError):
                pass
        self._process.join(10.0)
        if self._process.is_alive():
            self._process.kill()
