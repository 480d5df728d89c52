"""The coordinator's mirror of site ledgers, over real gRPC on loopback and a real store
(SQLite, then PostgreSQL).

Sites report their ledgers; the mirror is append-only; ``OpenRound`` is refused early
when a participating site's mirrored ledger cannot pay for the release; the Query
service returns every site's budget.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime

import grpc
import pytest

from fedlens import wire
from fedlens.query_client import QueryClient
from fedlens.types import RoundSpec, SiteLedger
from fedlens.v1 import aggregation_pb2, common_pb2, query_pb2
from privacy import LedgerEvent, PrivacyLedger, gaussian_noise_multiplier
from tests.server.conftest import Coordinator

pytestmark = pytest.mark.both_backends

NOW = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
TRAINING = LedgerEvent(
    kind="dpsgd",
    noise_multiplier=1.0,
    sampling_rate=0.03,
    steps=200,
    label="round 1",
    created_at=NOW,
)
RELEASE = LedgerEvent(kind="gaussian", noise_multiplier=3.0, label="release", created_at=NOW)


def ledger(site: str, *events: LedgerEvent, budget: float = 4.0) -> SiteLedger:
    return SiteLedger(site_id=site, budget_epsilon=budget, delta=1e-5, events=events)


def report(coord: Coordinator, snapshot: SiteLedger) -> aggregation_pb2.ReportLedgerResponse:
    request = aggregation_pb2.ReportLedgerRequest(ledger=wire.site_ledger_to_proto(snapshot))
    reply: aggregation_pb2.ReportLedgerResponse = coord.aggregation.ReportLedger(request)
    return reply


def round_spec(round_id: str, epsilon: float, sites: tuple[str, ...]) -> RoundSpec:
    return RoundSpec(
        round_id=round_id,
        kind="global_attribution",
        site_ids=sites,
        length=3,
        bits=40,
        scale=2.0**16,
        clip_bound=0.5,
        labels=("a", "b"),
        phase_timeout_s=5.0,
        params={"epsilon": repr(epsilon), "delta": "1e-06"},
    )


def open_round(coord: Coordinator, spec: RoundSpec) -> None:
    coord.aggregation.OpenRound(
        aggregation_pb2.OpenRoundRequest(spec=wire.round_spec_to_proto(spec))
    )


def test_reports_extend_the_mirror_and_the_query_service_returns_budgets(
    coordinator: Coordinator,
) -> None:
    first = report(coordinator, ledger("site-0", TRAINING))
    assert first.events == 1
    assert first.epsilon_spent == pytest.approx(
        PrivacyLedger(4.0, 1e-5, [TRAINING]).epsilon_spent()
    )
    second = report(coordinator, ledger("site-0", TRAINING, RELEASE))
    assert second.events == 2 and second.epsilon_spent > first.epsilon_spent
    report(coordinator, ledger("site-1", budget=2.0))
    with QueryClient(coordinator.running.address) as client:
        budgets = {b.site_id: b for b in client.list_budgets()}
        assert set(budgets) == {"site-0", "site-1"}
        assert budgets["site-0"].events == (TRAINING, RELEASE)
        assert budgets["site-0"].epsilon_spent == pytest.approx(second.epsilon_spent)
        assert budgets["site-0"].accountant == "pld"
        assert budgets["site-1"].epsilon_spent == 0.0 and budgets["site-1"].budget_epsilon == 2.0
        only = client.list_budgets(site_id="site-1")
        assert [b.site_id for b in only] == ["site-1"]


def test_a_report_that_rewrites_or_drops_events_is_refused_and_changes_nothing(
    coordinator: Coordinator,
) -> None:
    report(coordinator, ledger("site-0", TRAINING, RELEASE))
    before = coordinator.store.dump()["site_ledger_events"]
    rewritten = replace(RELEASE, noise_multiplier=30.0)
    for bad in (
        ledger("site-0", TRAINING),  # drops an event
        ledger("site-0", TRAINING, rewritten),  # rewrites one
        ledger("site-0", RELEASE, TRAINING, RELEASE),  # reorders
        ledger("site-0", TRAINING, RELEASE, budget=8.0),  # changes the budget
    ):
        with pytest.raises(grpc.RpcError) as err:
            report(coordinator, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "site-0" in (err.value.details() or "")
    assert coordinator.store.dump()["site_ledger_events"] == before
    refused = [e for e in coordinator.store.audit_entries() if e.action == "report_ledger"]
    assert [e.outcome for e in refused] == ["ok"] + ["refused"] * 4


def test_a_malformed_event_is_refused_naming_the_field(coordinator: Coordinator) -> None:
    bad = wire.site_ledger_to_proto(ledger("site-0", TRAINING))
    bad.events.append(
        common_pb2.LedgerEvent(kind="gaussian", noise_multiplier=float("nan"), created_at="x")
    )
    with pytest.raises(grpc.RpcError) as err:
        coordinator.aggregation.ReportLedger(aggregation_pb2.ReportLedgerRequest(ledger=bad))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ledger event" in (err.value.details() or "")
    assert coordinator.store.site_ledgers() == []


def test_open_round_is_refused_early_when_a_mirrored_site_cannot_afford_it(
    coordinator: Coordinator,
) -> None:
    # site-1 has spent nearly all of a small budget; site-0 has room; site-2 never reported.
    nearly = LedgerEvent(
        kind="gaussian", noise_multiplier=gaussian_noise_multiplier(0.95, 1e-5), created_at=NOW
    )
    report(coordinator, ledger("site-0", TRAINING))
    report(coordinator, ledger("site-1", nearly, budget=1.0))
    sites = ("site-0", "site-1", "site-2")
    with pytest.raises(grpc.RpcError) as err:
        open_round(coordinator, round_spec("too-much", 1.0, sites))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.value.details() or ""
    assert "site-1" in details and "site-0" not in details
    assert not coordinator.store.round_exists("too-much")
    audit = coordinator.store.audit_entries(round_id="too-much")
    assert [(e.action, e.outcome) for e in audit] == [("open_round", "refused")]
    # Without site-1, the same release fits everybody mirrored.
    open_round(coordinator, round_spec("fits", 1.0, ("site-0", "site-2")))
    assert coordinator.store.round_exists("fits")


def test_budgets_reach_the_cli_as_json(
    coordinator: Coordinator, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedlens.cli import main

    report(coordinator, ledger("site-0", TRAINING, RELEASE))
    assert main(["query", "budgets", "--address", coordinator.running.address, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["site_id"] == "site-0" and len(out[0]["events"]) == 2
    assert main(["query", "budgets", "--address", coordinator.running.address]) == 0
    assert "site-0" in capsys.readouterr().out


def test_site_ledger_round_trips_through_the_wire() -> None:
    snapshot = SiteLedger(
        site_id="s",
        budget_epsilon=3.0,
        delta=1e-6,
        events=(TRAINING, RELEASE),
        epsilon_spent=1.5,
        accountant="pld",
        reserved_epsilon=0.75,
    )
    assert wire.site_ledger_from_proto(wire.site_ledger_to_proto(snapshot)) == snapshot
    assert SiteLedger.from_dict(json.loads(json.dumps(snapshot.to_dict()))) == snapshot
    assert query_pb2.ListBudgetsResponse(ledgers=[wire.site_ledger_to_proto(snapshot)])
