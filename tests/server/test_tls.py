"""The coordinator's gRPC server with TLS, over loopback, with certificates from the test PKI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlens.channels import open_channel, server_credentials
from fedlens.errors import ConfigurationError, ProtocolError
from fedlens.identity import TlsFiles, create_test_pki
from fedlens.query_client import QueryClient
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.storage import Store


def _now() -> datetime:
    # The handshake checks validity against the real clock, so the PKI is issued for it.
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return create_test_pki(
        tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"], now=_now(), days=1
    )


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return create_test_pki(
        tmp_path_factory.mktemp("other"), ["localhost", "127.0.0.1"], now=_now(), days=1
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path_factory.mktemp('db') / 'fedlens.db'}")
    yield s
    s.close()


@pytest.fixture(scope="module")
def tls_server(pki: TlsFiles, store: Store) -> Iterator[RunningServer]:
    running = serve(
        Aggregator(store), QueryHandler(store), tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    yield running
    running.stop(grace=None)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_query_service_over_tls_with_the_ca(
    tls_server: RunningServer, pki: TlsFiles, host: str
) -> None:
    assert tls_server.tls
    with QueryClient(f"{host}:{tls_server.port}", tls_ca=pki.ca_cert) as client:
        assert client.list_releases() == []
        assert client.list_budgets() == []


def test_health_over_a_tls_channel(tls_server: RunningServer, pki: TlsFiles) -> None:
    channel = open_channel(tls_server.address, tls_ca=pki.ca_cert)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fedlens.v1.Query"), timeout=5
        )
    finally:
        channel.close()
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_is_refused_with_a_hint(tls_server: RunningServer) -> None:
    with (
        QueryClient(tls_server.address, timeout_s=5) as client,
        pytest.raises(ProtocolError) as info,
    ):
        client.list_releases()
    message = str(info.value)
    assert f"no answer from the fedlens server at {tls_server.address}" in message
    assert "plaintext; a server with TLS needs its CA certificate" in message


def test_client_trusting_another_ca_fails_certificate_verification(
    tls_server: RunningServer, other_pki: TlsFiles
) -> None:
    with (
        QueryClient(tls_server.address, tls_ca=other_pki.ca_cert, timeout_s=5) as client,
        pytest.raises(ProtocolError) as info,
    ):
        client.list_releases()
    message = str(info.value)
    assert f"TLS, trusting {other_pki.ca_cert}" in message
    assert "CERTIFICATE_VERIFY_FAILED" in message


def test_server_certificate_must_name_the_host_dialled(
    tmp_path: Path, store: Store, tls_server: RunningServer
) -> None:
    elsewhere = create_test_pki(tmp_path, ["coordinator.example.org"], now=_now(), days=1)
    running = serve(
        Aggregator(store),
        QueryHandler(store),
        tls_cert=elsewhere.server_cert,
        tls_key=elsewhere.server_key,
    )
    try:
        with (
            QueryClient(running.address, tls_ca=elsewhere.ca_cert, timeout_s=5) as client,
            pytest.raises(ProtocolError),
        ):
            client.list_releases()
    finally:
        running.stop(grace=None)


def test_plaintext_server_still_serves_plaintext_clients(store: Store) -> None:
    running = serve(Aggregator(store), QueryHandler(store))
    try:
        assert not running.tls
        with QueryClient(running.address) as client:
            assert client.list_releases() == []
    finally:
        running.stop(grace=None)


def test_serve_refuses_half_or_mismatched_tls(
    store: Store, pki: TlsFiles, other_pki: TlsFiles, tmp_path: Path
) -> None:
    agg, query = Aggregator(store), QueryHandler(store)
    with pytest.raises(ConfigurationError, match="both a certificate chain and its private key"):
        serve(agg, query, tls_cert=pki.server_cert)
    with pytest.raises(ConfigurationError, match="does not belong to the certificate"):
        serve(agg, query, tls_cert=pki.server_cert, tls_key=other_pki.server_key)
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError, match=f"TLS certificate {missing} does not exist"):
        serve(agg, query, tls_cert=missing, tls_key=pki.server_key)
    with pytest.raises(ConfigurationError, match=f"TLS certificate {pki.server_key} holds no PEM"):
        serve(agg, query, tls_cert=pki.server_key, tls_key=pki.server_key)
    with pytest.raises(ConfigurationError, match=f"{pki.server_cert} is not a PEM private key"):
        server_credentials(pki.server_cert, pki.server_cert)


def test_open_channel_refuses_a_ca_file_that_is_not_a_certificate(
    pki: TlsFiles, tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError, match=f"TLS CA certificate {pki.ca_key} holds no PEM"):
        open_channel("127.0.0.1:1", tls_ca=pki.ca_key)
    with pytest.raises(ConfigurationError, match="does not exist"):
        open_channel("127.0.0.1:1", tls_ca=tmp_path / "nope.pem")
    channel = open_channel("127.0.0.1:1", options=[("grpc.max_receive_message_length", 1024)])
    assert isinstance(channel, grpc.Channel)
    channel.close()


def test_a_secure_aggregation_round_over_tls_from_site_configs(
    tls_server: RunningServer, pki: TlsFiles, tmp_path: Path
) -> None:
    """Sites given the CA in their node config run the whole protocol over TLS."""
    import json
    import threading

    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from client.secagg_client import SiteInput, run_secure_round
    from client.site import Site
    from client.site_config import SiteConfig
    from fedlens.runconfig import RunConfig
    from fedlens.types import PrivacyCost, RoundPhase, RoundSpec
    from privacy import FixedPointCodec, SeededRandom
    from privacy.secagg_params import SecAggParams
    from privacy.secagg_site import SiteSession

    sites = ("site-0", "site-1")
    spec = RoundSpec(
        round_id="tls-round",
        kind="global_attribution",
        site_ids=sites,
        length=2,
        bits=40,
        scale=2.0**16,
        clip_bound=0.5,
        labels=("x",),
        phase_timeout_s=20.0,
        params={"groups": json.dumps({"x": [0]})},
    )
    from fedlens import wire
    from fedlens.v1 import aggregation_pb2, aggregation_pb2_grpc

    with open_channel(f"localhost:{tls_server.port}", tls_ca=pki.ca_cert) as channel:
        aggregation_pb2_grpc.AggregationStub(channel).OpenRound(
            aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec))
        )
    codec = FixedPointCodec(bits=40, scale=2.0**16)
    params = SecAggParams(spec.round_id, sites, 2, spec.length, spec.bits)
    statuses: dict[str, object] = {}

    def one(index: int) -> None:
        config = SiteConfig.from_flower(
            {
                "partition-id": index,
                "num-partitions": 2,
                "state-dir": str(tmp_path / f"s{index}"),
                "aggregator-ca": str(pki.ca_cert),
            }
        )
        site = Site(RunConfig(), config)
        session = SiteSession(params, site.name, Ed25519PrivateKey.generate())
        vector = np.array([0.25 * (index + 1), 10 * 0.5])
        cost = PrivacyCost(site.name, 0.1, 1e-6, 0.1)
        with site._connect(f"localhost:{tls_server.port}") as client:
            statuses[site.name] = run_secure_round(
                client,
                session,
                lambda: SiteInput(codec.encode(vector, SeededRandom(index)), cost, 0.0),
                timeout_s=20.0,
            )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {getattr(s, "phase", None) for s in statuses.values()} == {RoundPhase.COMPLETE}
