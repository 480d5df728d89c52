"""One benchmark round against an aggregator process: run, measured and checked.

The round's wall time runs from ``OpenRound`` to the last site seeing the round end; the
aggregator's CPU time and memory come from its process (:mod:`benchmarks.secagg_server`),
the sites' CPU times from their threads (:mod:`benchmarks.secagg_sites`).

``prg_floor_s`` is the CPU time of expanding, with the protocol's own ChaCha20 generator
(:func:`privacy.secagg_crypto.self_mask` and :func:`~privacy.secagg_crypto.expand_mask`),
exactly the masks the aggregator must remove: one self mask per survivor and one pairwise
mask per (dropped site, surviving neighbour).

Every round is checked: in a fedlens mode the sum the aggregator releases must equal,
exactly, the fixed-point decoding (:class:`privacy.FixedPointCodec`) of the sum of the
survivors' encodings, and lie within one quantisation step per survivor of the plain float64
sum of their vectors. The plain round's sum must equal that float64 sum. Any mismatch raises
:class:`fedlens.errors.IntegrityError`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from benchmarks.secagg_server import ServerProcess
from benchmarks.secagg_setup import dropped_indices, protocol_params, round_spec
from benchmarks.secagg_sites import SiteJob, run_site_groups
from fedlens import wire
from fedlens.errors import DropoutError, IntegrityError
from fedlens.types import RoundSpec
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc
from privacy import FixedPointCodec
from privacy.secagg_crypto import KEY_BYTES, expand_mask, self_mask
from privacy.secagg_params import SecAggParams

__all__ = ["RoundResult", "pairwise_masks", "prg_floor", "run_round", "verify_released"]


@dataclass
class RoundResult:
    mode: str
    sites: int
    dim: int
    degree: int
    seconds: float
    server_cpu_s: float
    server_peak_mib: float
    server_rss_before_mib: float
    site_cpu_s: list[float]
    dropped_site_cpu_s: list[float]
    prg_floor_s: float | None
    masks_removed: int
    max_abs_error: float
    error_bound: float
    sum_verified: bool
    profile: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "sites": self.sites,
            "dim": self.dim,
            "degree": self.degree,
            "seconds": round(self.seconds, 4),
            "server_cpu_s": round(self.server_cpu_s, 4),
            "server_peak_mib": round(self.server_peak_mib, 1),
            "server_rss_before_mib": round(self.server_rss_before_mib, 1),
            "server_round_mib": round(self.server_peak_mib - self.server_rss_before_mib, 1),
            "site_cpu_s_median": round(statistics.median(self.site_cpu_s), 4),
            "site_cpu_s_max": round(max(self.site_cpu_s), 4),
            "dropped_site_cpu_s_median": (
                round(statistics.median(self.dropped_site_cpu_s), 4)
                if self.dropped_site_cpu_s
                else None
            ),
            "prg_floor_s": None if self.prg_floor_s is None else round(self.prg_floor_s, 4),
            "masks_removed": self.masks_removed,
            "max_abs_error": self.max_abs_error,
            "error_bound": self.error_bound,
            "sum_verified": self.sum_verified,
        }


_round_counter = 0


def run_round(
    server: ServerProcess,
    mode: str,
    sites: int,
    dim: int,
    dropout: float,
    *,
    seed: int = 0,
    workers: int = 0,
    poll_s: float = 0.05,
    timeout_s: float = 600.0,
) -> RoundResult:
    """One round of ``mode`` against ``server``, measured and checked."""
    global _round_counter
    _round_counter += 1
    round_id = f"bench-{mode}-{sites}x{dim}-{os.getpid()}-{_round_counter}"
    spec = round_spec(mode, sites, dim, round_id, timeout_s)
    dropped = dropped_indices(sites, dropout, seed)
    groups = max(workers, 1)
    jobs = [
        SiteJob(
            mode,
            server.address,
            spec,
            tuple(range(g, sites, groups)),
            dropped,
            seed,
            poll_s,
            timeout_s,
        )
        for g in range(groups)
    ]
    channel = grpc.insecure_channel(server.address)
    stub = aggregation_pb2_grpc.AggregationStub(channel)

    def start_round() -> None:
        server.begin()
        stub.OpenRound(
            aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec)), timeout=60
        )

    try:
        outcomes, started = run_site_groups(jobs, start_round, workers)
    finally:
        channel.close()
    report = server.end(round_id)
    results = [site for outcome in outcomes for site in outcome.sites]
    failed = [f"{r.site_id}: {r.error}" for r in results if r.error]
    if failed:
        raise DropoutError(f"{mode} round {round_id}: sites failed: {'; '.join(failed[:5])}")
    seconds = max(r.ended for r in results) - started

    survivors = [r.site_id for r in results if not r.dropped]
    gone = [r.site_id for r in results if r.dropped]
    expected = np.sum([o.float_sum for o in outcomes], axis=0)
    released = report["released"]
    if released is None:
        raise IntegrityError(f"{mode} round {round_id} released nothing")
    params = protocol_params(spec)
    floor: float | None = None
    masks = 0
    encoded: np.ndarray | None = None
    if mode != "plain":
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        partial = [o.encoded_sum for o in outcomes if o.encoded_sum is not None]
        encoded = codec.sum(partial) if partial else np.zeros(0, dtype=np.uint64)
        masks = len(survivors) + pairwise_masks(params, survivors, gone)
        floor = prg_floor(params, survivors, gone)
    error, bound = verify_released(
        f"{mode} round {round_id}", released, expected, encoded, spec, len(survivors)
    )
    return RoundResult(
        mode=mode,
        sites=sites,
        dim=dim,
        degree=params.degree if mode != "plain" else 0,
        seconds=seconds,
        server_cpu_s=report["cpu_s"],
        server_peak_mib=report["peak_mib"],
        server_rss_before_mib=report["rss_before_mib"],
        site_cpu_s=[r.cpu_s for r in results if not r.dropped],
        dropped_site_cpu_s=[r.cpu_s for r in results if r.dropped],
        prg_floor_s=floor,
        masks_removed=masks,
        max_abs_error=error,
        error_bound=bound,
        sum_verified=True,
        profile=report["profile"],
    )


def verify_released(
    what: str,
    released: np.ndarray,
    plain_sum: np.ndarray,
    encoded_sum: np.ndarray | None,
    spec: RoundSpec,
    survivors: int,
) -> tuple[float, float]:
    """Check a released sum; its largest error from ``plain_sum`` and the bound it met.

    Parameters
    ----------
    released
        ``(dim,)`` float64 sum the aggregator released.
    plain_sum
        ``(dim,)`` float64 sum of the survivors' float32 vectors.
    encoded_sum
        ``(dim,)`` uint64 sum modulo ``2**bits`` of the survivors' encodings for a masked
        round, whose decoding the release must equal exactly; ``None`` for the plain round.

    Raises
    ------
    IntegrityError
        The release differs from the decoded encodings, or from ``plain_sum`` by more than
        one quantisation step per survivor (``1e-9`` relative for the plain round).
    """
    released = np.asarray(released, dtype=np.float64)
    if released.shape != plain_sum.shape:
        raise IntegrityError(f"{what}: released shape {released.shape}, not {plain_sum.shape}")
    error = float(np.max(np.abs(released - plain_sum), initial=0.0))
    if encoded_sum is None:
        bound = 1e-9 * max(1.0, float(np.max(np.abs(plain_sum), initial=0.0)))
        exact = True
    else:
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        bound = survivors / spec.scale
        exact = encoded_sum.shape == released.shape and bool(
            np.array_equal(codec.decode(encoded_sum), released)
        )
    if not exact or not error <= bound:
        raise IntegrityError(
            f"{what}: the released sum differs from the sum of the survivors' vectors "
            f"(exact match with their encodings: {exact}; max |error| {error:.3g}, "
            f"allowed {bound:.3g})"
        )
    return error, bound


def prg_floor(params: SecAggParams, survivors: Sequence[str], dropped: Sequence[str]) -> float:
    """CPU seconds to expand the masks the aggregator removes, with the protocol's PRG.

    One self mask per survivor and one pairwise mask per (dropped site, surviving
    neighbour); random keys stand in for the rebuilt ones (the keystream costs the same).
    """
    alive = set(survivors)
    pairs = pairwise_masks(params, survivors, dropped)
    keys = [os.urandom(KEY_BYTES) for _ in range(len(alive) + pairs)]
    start = time.thread_time()
    for key in keys[: len(alive)]:
        self_mask(key, round_id=params.round_id, length=params.length, bits=params.bits)
    for key in keys[len(alive) :]:
        expand_mask(key, params.length, params.bits)
    return time.thread_time() - start


def pairwise_masks(params: SecAggParams, survivors: Sequence[str], dropped: Sequence[str]) -> int:
    """How many (dropped site, surviving neighbour) pairs the aggregator unmasks."""
    alive = set(survivors)
    return sum(len(params.neighbours[site] & alive) for site in dropped)
