"""Cost of masked aggregation against a plain sum of the same vectors.

    python -m benchmarks.secagg --json OUT [--sites 8] [--lengths 1000 10000 100000]

For each vector length ``m``: the site side (fixed-point encoding with stochastic
rounding, X25519 agreement, HKDF and ChaCha20 expansion of one mask per peer) and the
aggregator side (validating and adding every masked vector into the running sum, then
decoding) are timed, and compared with the baseline of summing the same float vectors
with numpy. Ratios are per-site cost / baseline per-site cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedlens.types import KeyAdvertisement, MaskedSubmission, PrivacyCost, RoundSpec
from privacy import FixedPointCodec, SecureRandom, generate_keypair, mask_vector
from privacy.aggregation_round import AggregationRound


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(sites: int, length: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=length) for _ in range(sites)]
    codec = FixedPointCodec.choose(num_sites=sites, max_abs=1e6, precision=1e-5)
    keys = [generate_keypair() for _ in range(sites)]
    ids = [f"site-{i}" for i in range(sites)]
    peers = {i: k.public_bytes for i, k in zip(ids, keys, strict=True)}
    noise = SecureRandom()

    def site_side() -> list[np.ndarray]:
        return [
            mask_vector(codec.encode(v, noise), k, i, peers, "bench", codec.bits)
            for v, k, i in zip(vectors, keys, ids, strict=True)
        ]

    masked = site_side()
    spec = RoundSpec(
        round_id="bench",
        kind="global_attribution",
        site_ids=tuple(ids),
        length=length,
        bits=codec.bits,
        scale=codec.scale,
        clip_bound=1.0,
        labels=tuple(f"x{j}" for j in range(length - 1)),
    )

    def server_side() -> np.ndarray:
        state = AggregationRound(spec, now=0.0)
        for i, k in zip(ids, keys, strict=True):
            state.advertise(KeyAdvertisement("bench", i, k.public_bytes), now=0.0)
        for i, m in zip(ids, masked, strict=True):
            sub = MaskedSubmission(
                round_id="bench",
                site_id=i,
                values=m,
                cost=PrivacyCost(site_id=i, epsilon=1.0, delta=1e-6, epsilon_total=1.0),
                noise_std=0.0,
            )
            state.submit(sub, now=0.0)
        return codec.decode(state.result().encoded_sum)

    def baseline() -> np.ndarray:
        total = np.zeros(length)
        for v in vectors:
            total += v
        return total

    recovered = server_side()
    error = float(np.max(np.abs(recovered - baseline())))
    base = best_of(baseline, repeats)
    site = best_of(site_side, repeats) / sites
    server = best_of(server_side, repeats)
    return {
        "length": length,
        "baseline_s": base,
        "site_s": site,
        "server_s": server,
        "site_ratio": site / (base / sites),
        "server_ratio": server / base,
        "max_abs_error": error,
        "bits": codec.bits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, type=Path, help="where to write the results")
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {
        "benchmark": "secagg",
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "sites": args.sites,
        "baseline": "numpy sum of the same float64 vectors, unmasked",
        "runs": [measure(args.sites, m, args.repeats) for m in args.lengths],
    }
    args.json.write_text(json.dumps(results, indent=2))
    for r in results["runs"]:
        print(
            f"m={r['length']:>7}: site {r['site_s'] * 1e3:8.2f} ms, "
            f"server {r['server_s'] * 1e3:8.2f} ms for {args.sites} sites; "
            f"baseline sum {r['baseline_s'] * 1e3:6.3f} ms;"
            f" max error {r['max_abs_error']:.1e}"
        )


if __name__ == "__main__":
    main()
