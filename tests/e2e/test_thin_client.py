"""The thin client runs a site of a real round with numpy, grpcio, protobuf and cryptography.

Two sites are separate Python processes that import only :mod:`client.thin` (and through
it :mod:`client.secagg_client` and :mod:`privacy.secagg_site`); the third is a thread of
this process driving :func:`client.secagg_client.run_secure_round` itself. The aggregator
is a real gRPC server in this process, over SQLite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.secagg_client import AggregationClient, SiteInput, run_secure_round
from client.thin import round_params
from fedlens import wire
from fedlens.types import PrivacyCost, RoundPhase, RoundSpec, RoundStatus
from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc, query_pb2, query_pb2_grpc
from privacy import FixedPointCodec, SecureRandom, SeededRandom, clip_rows
from privacy.secagg_site import SiteSession
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.storage import Store
from tests.secagg_spec import CLIP, attribution_round

ROOT = Path(__file__).resolve().parents[2]
CLIP_NORM = 40.0
TIMEOUT_S = 60.0
HEAVY = ("torch", "flwr", "opacus", "captum", "dp_accounting", "sqlalchemy")
# Distributions the thin client may load: the four it needs, what they import themselves
# (cffi, typing_extensions, and grpcio's add-ons, which grpc imports whenever they are
# installed), setuptools' import hook, and fedlens.
THIN_DISTRIBUTIONS = {
    "numpy",
    "grpcio",
    "protobuf",
    "cryptography",
    "cffi",
    "typing_extensions",
    "grpcio-health-checking",
    "grpcio-reflection",
    "grpcio-tools",
    "setuptools",
    "fedlens",
}

# Runs in a fresh interpreter: argv[1] is JSON with the address, the wire-encoded spec,
# the site, its vector, its noise and the seed of its (test-only) noise source.
SITE_SCRIPT = """
import json, sys
from importlib.metadata import packages_distributions

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import client.secagg_client, privacy.secagg_site  # the modules the thin path rests on
from client.thin import contribute_vector
from fedlens import wire
from fedlens.types import PrivacyCost
from fedlens.v1 import aggregation_pb2
from privacy.randomness import SeededRandom

args = json.loads(sys.argv[1])
spec = wire.round_spec_from_proto(aggregation_pb2.RoundSpec.FromString(bytes.fromhex(args["spec"])))
site = args["site"]
status = contribute_vector(
    args["address"],
    spec,
    site,
    np.array(args["vector"]),
    Ed25519PrivateKey.generate(),
    clip_norm=args["clip_norm"],
    noise_std=args["noise_std"],
    cost=PrivacyCost(site, epsilon=0.5, delta=1e-6, epsilon_total=0.5),
    rng=SeededRandom(args["seed"]),
    timeout_s=args["timeout_s"],
)
heavy = sorted(m for m in args["heavy"] if m in sys.modules)
top_level = {m.split(".")[0] for m in sys.modules}
owners = packages_distributions()
distributions = sorted({d for m in top_level for d in owners.get(m, ())})
print(json.dumps({"phase": status.phase.value, "release_id": status.release_id,
                  "heavy": heavy, "distributions": distributions}))
assert not heavy, heavy
"""


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[RunningServer]:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    running = serve(Aggregator(store), QueryHandler(store))
    try:
        yield running
    finally:
        running.stop(grace=None)
        store.close()


def round_spec() -> RoundSpec:
    return attribution_round("thin", ("thin-1", "thin-2", "full"), phase_timeout_s=TIMEOUT_S)


def thin_site(
    address: str, spec: RoundSpec, site: str, vector: np.ndarray, noise_std: float, seed: int
) -> subprocess.Popen[str]:
    args = {
        "address": address,
        "spec": wire.round_spec_to_proto(spec).SerializeToString().hex(),
        "site": site,
        "vector": vector.tolist(),
        "clip_norm": CLIP_NORM,
        "noise_std": noise_std,
        "seed": seed,
        "timeout_s": TIMEOUT_S,
        "heavy": HEAVY,
    }
    return subprocess.Popen(
        [sys.executable, "-c", SITE_SCRIPT, json.dumps(args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_thin_client_sites_and_a_full_site_release_the_right_sum(
    aggregator: RunningServer,
) -> None:
    spec = round_spec()
    with grpc.insecure_channel(aggregator.address) as channel:
        aggregation_pb2_grpc.AggregationStub(channel).OpenRound(
            aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec))
        )
    vectors = {
        "thin-1": np.array([1.5, -0.25, 0.75, 20 * CLIP]),
        # Longer than CLIP_NORM: the thin client scales it down before noising it.
        "thin-2": np.array([30.0, 12.0, -25.0, 60 * CLIP]),
        "full": np.array([-2.0, 0.5, 1.0, 30 * CLIP]),
    }
    noise = {"thin-1": (0.0, 11), "thin-2": (0.05, 12)}
    processes = {
        site: thin_site(aggregator.address, spec, site, vectors[site], std, seed)
        for site, (std, seed) in noise.items()
    }

    full: list[RoundStatus | Exception] = []

    def run_full_site() -> None:
        session = SiteSession(round_params(spec), "full", Ed25519PrivateKey.generate())
        codec = FixedPointCodec(bits=spec.bits, scale=spec.scale)
        cost = PrivacyCost("full", epsilon=0.5, delta=1e-6, epsilon_total=0.5)

        def make_input() -> SiteInput:
            return SiteInput(codec.encode(vectors["full"], SecureRandom()), cost, 0.0)

        with AggregationClient(aggregator.address) as client:
            try:
                full.append(run_secure_round(client, session, make_input, timeout_s=TIMEOUT_S))
            except Exception as exc:  # asserted on below
                full.append(exc)

    thread = threading.Thread(target=run_full_site, daemon=True)
    thread.start()
    reports = {}
    for site, process in processes.items():
        out, err = process.communicate(timeout=3 * TIMEOUT_S)
        assert process.returncode == 0, f"{site} failed:\n{err}"
        reports[site] = json.loads(out.strip().splitlines()[-1])
    thread.join(TIMEOUT_S)
    assert len(full) == 1 and isinstance(full[0], RoundStatus), full
    assert full[0].phase is RoundPhase.COMPLETE

    for site, report in reports.items():
        assert report["phase"] == "complete"
        assert report["release_id"] == full[0].release_id
        assert report["heavy"] == [], f"{site} imported {report['heavy']}"
        assert set(report["distributions"]) <= THIN_DISTRIBUTIONS, report["distributions"]

    # What the thin client sent: the clipped vector plus noise drawn first from its source.
    sent = {
        site: clip_rows(vectors[site][None, :], CLIP_NORM)[0]
        + SeededRandom(seed).normal(spec.length, std)
        for site, (std, seed) in noise.items()
    }
    assert np.linalg.norm(sent["thin-2"] - vectors["thin-2"]) > 1.0  # clipping changed it
    total = sent["thin-1"] + sent["thin-2"] + vectors["full"]
    with grpc.insecure_channel(aggregator.address) as channel:
        reply = query_pb2_grpc.QueryStub(channel).GetRelease(
            query_pb2.GetReleaseRequest(release_id=full[0].release_id)
        )
    release = wire.release_from_proto(reply)
    count = total[-1] / CLIP
    assert release.noised_count == pytest.approx(count, abs=1e-3)
    np.testing.assert_allclose([v.value for v in release.values], total[:-1] / count, atol=1e-5)
    assert release.values[0].noise_std == pytest.approx(0.05 / count)
    assert sorted(c.site_id for c in release.costs) == sorted(spec.site_ids)
