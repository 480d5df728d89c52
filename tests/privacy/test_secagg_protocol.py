"""The site and server state machines of secure aggregation, driven in memory."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlens.errors import (
    ConfigurationError,
    DropoutError,
    DuplicateSubmissionError,
    IntegrityError,
    StaleRoundError,
)
from fedlens.secagg_types import EncryptedShare, SecAggPhase, SignedKeys
from privacy.secagg_crypto import raw_public
from privacy.secagg_local import PHASES, identities, run_round
from privacy.secagg_params import SecAggParams, default_threshold
from privacy.secagg_server import ServerSession
from privacy.secagg_site import SiteSession

BITS = 40


def _inputs(params: SecAggParams, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        site: rng.integers(0, 1 << params.bits, params.length, dtype=np.uint64)
        for site in params.site_ids
    }


def _plain_sum(
    params: SecAggParams, inputs: dict[str, np.ndarray], sites: tuple[str, ...]
) -> np.ndarray:
    total = np.zeros(params.length, dtype=np.uint64)
    for site in sites:
        total += inputs[site]
    return total & np.uint64((1 << params.bits) - 1)


@st.composite
def _rounds(draw: st.DrawFn) -> tuple[SecAggParams, dict[str, str], int]:
    n = draw(st.integers(3, 9))
    site_ids = tuple(f"site-{i:02d}" for i in range(n))
    threshold = draw(st.integers(n // 2 + 1, n))
    degree = draw(st.sampled_from([0, 2, 4]))
    if degree >= n - 1:
        degree = 0
    length = draw(st.integers(1, 40))
    params = SecAggParams(
        round_id=f"r-{draw(st.integers(0, 10**6))}",
        site_ids=site_ids,
        threshold=threshold,
        length=length,
        bits=draw(st.integers(8, 62)),
        degree=degree,
    )
    drops = draw(
        st.dictionaries(st.sampled_from(site_ids), st.sampled_from(PHASES), max_size=n - 1)
    )
    return params, drops, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_rounds())
def test_unmasked_sum_equals_plain_sum_of_survivors(
    case: tuple[SecAggParams, dict[str, str], int],
) -> None:
    params, drops, seed = case
    inputs = _inputs(params, seed)
    server, _ = run_round(params, inputs, drops)
    if server.phase is SecAggPhase.COMPLETE:
        assert len(server.submitted) >= params.threshold
        np.testing.assert_array_equal(server.result(), _plain_sum(params, inputs, server.submitted))
        # Everyone that dropped before submitting is out of the sum.
        assert not set(server.submitted) & {s for s, p in drops.items() if p in PHASES[:3]}
    else:
        assert server.phase is SecAggPhase.ABORTED
        assert server.reason
        with pytest.raises(StaleRoundError):
            server.result()


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("degree", [0, 4])
def test_a_dropout_at_each_phase_above_threshold_completes(phase: str, degree: int) -> None:
    params = SecAggParams("r1", tuple(f"s{i}" for i in range(8)), 5, 16, BITS, degree=degree)
    inputs = _inputs(params, 1)
    server, _ = run_round(params, inputs, {"s3": phase, "s6": phase})
    assert server.phase is SecAggPhase.COMPLETE, server.reason
    survivors = server.submitted
    expected_out = {"s3", "s6"} if phase != "unmask" else set()
    assert expected_out.isdisjoint(survivors)
    np.testing.assert_array_equal(server.result(), _plain_sum(params, inputs, survivors))


@pytest.mark.parametrize("phase", PHASES)
def test_dropouts_below_threshold_abort_revealing_nothing(phase: str) -> None:
    params = SecAggParams("r2", tuple(f"s{i}" for i in range(5)), 4, 8, BITS)
    server, _ = run_round(params, _inputs(params, 2), {"s0": phase, "s1": phase})
    assert server.phase is SecAggPhase.ABORTED
    assert "threshold" in server.reason or "needed" in server.reason
    assert server.running_sum.size == 0
    with pytest.raises(StaleRoundError):
        server.result()


def _advertised_round(n: int = 4) -> tuple[ServerSession, dict[str, SiteSession], dict[str, bytes]]:
    params = SecAggParams("r3", tuple(f"s{i}" for i in range(n)), n - 1, 4, BITS)
    ids = identities(params.site_ids)
    public = {s: raw_public(k) for s, k in ids.items()}
    server = ServerSession(params, now=0.0, phase_timeout_s=10.0)
    sites = {s: SiteSession(params, s, ids[s]) for s in params.site_ids}
    for site in params.site_ids:
        server.advertise(sites[site].advertise(), public[site], now=1.0)
    return server, sites, public


def test_site_refuses_to_reveal_both_shares_of_one_peer() -> None:
    server, sites, public = _advertised_round()
    for site, session in sites.items():
        keys = server.keys_for(site, now=1.0)
        assert keys is not None
        server.share(site, session.share_keys(keys, public), now=1.0)
    for site, session in sites.items():
        received = server.shares_for(site, now=1.0)
        assert received is not None
        session.masked_input(np.zeros(4, dtype=np.uint64), received)
    with pytest.raises(IntegrityError, match="both the self-mask and the mask-key"):
        sites["s0"].unmask(["s0", "s1", "s2", "s3"], ["s1"])
    # A site that refused reveals nothing later either: each step runs once.
    with pytest.raises(StaleRoundError):
        sites["s0"].unmask(["s0", "s2", "s3"], ["s1"])


def test_site_refuses_to_unmask_fewer_than_threshold_inputs() -> None:
    params = SecAggParams("r4", ("a", "b", "c"), 2, 4, BITS)
    server, sites = run_round(
        params, _inputs(params, 3), {"a": "unmask", "b": "unmask", "c": "unmask"}
    )
    assert server.phase is SecAggPhase.ABORTED
    with pytest.raises(DropoutError, match="threshold"):
        sites["a"].unmask(["a"], ["b", "c"])


def test_forged_signature_is_refused_by_server_and_sites() -> None:
    params = SecAggParams("r5", ("a", "b", "c"), 2, 4, BITS)
    ids = identities(params.site_ids)
    public = {s: raw_public(k) for s, k in ids.items()}
    server = ServerSession(params, now=0.0, phase_timeout_s=10.0)
    mallory = SiteSession(params, "a", Ed25519PrivateKey.generate())
    forged = mallory.advertise()
    with pytest.raises(IntegrityError, match="not signed by its enrolled identity"):
        server.advertise(forged, public["a"], now=0.0)
    assert server.advertised == ()
    site_b = SiteSession(params, "b", ids["b"])
    own = site_b.advertise()
    with pytest.raises(IntegrityError, match="not signed"):
        site_b.share_keys({"a": forged, "b": own}, public)


def test_replayed_keys_from_another_round_are_refused() -> None:
    params = SecAggParams("r6", ("a", "b", "c"), 2, 4, BITS)
    other = SecAggParams("r7", ("a", "b", "c"), 2, 4, BITS)
    ids = identities(params.site_ids)
    old = SiteSession(other, "a", ids["a"]).advertise()
    server = ServerSession(params, now=0.0, phase_timeout_s=10.0)
    with pytest.raises(IntegrityError, match="round"):
        server.advertise(old, raw_public(ids["a"]), now=0.0)
    replay = SignedKeys("r6", "a", old.cipher_public, old.mask_public, old.signature)
    with pytest.raises(IntegrityError, match="not signed"):
        server.advertise(replay, raw_public(ids["a"]), now=0.0)


def test_rejected_messages_leave_the_round_intact() -> None:
    server, sites, public = _advertised_round()
    keys = server.keys_for("s0", now=1.0)
    assert keys is not None
    sealed = sites["s0"].share_keys(keys, public)
    with pytest.raises(IntegrityError, match="expected one for each"):
        server.share("s0", sealed[:-1], now=1.0)
    bad = (EncryptedShare("r3", "s0", sealed[0].receiver, b"x" * 10), *sealed[1:])
    with pytest.raises(IntegrityError, match="bytes, expected"):
        server.share("s0", bad, now=1.0)
    assert server.shared == ()
    server.share("s0", sealed, now=1.0)
    with pytest.raises(DuplicateSubmissionError):
        server.share("s0", sealed, now=1.0)
    with pytest.raises(StaleRoundError, match="sharing, not collecting"):
        server.submit("s0", np.zeros(4, dtype=np.uint64), now=1.0)
    with pytest.raises(IntegrityError, match="not part of round"):
        server.keys_for("eve", now=1.0)
    assert server.shared == ("s0",)


def test_tampered_ciphertext_is_refused_by_its_receiver() -> None:
    server, sites, public = _advertised_round(3)
    for site, session in sites.items():
        keys = server.keys_for(site, now=1.0)
        assert keys is not None
        server.share(site, session.share_keys(keys, public), now=1.0)
    received = list(server.shares_for("s1", now=1.0) or ())
    first = received[0]
    flipped = bytes([first.ciphertext[0] ^ 1]) + first.ciphertext[1:]
    received[0] = EncryptedShare(first.round_id, first.sender, first.receiver, flipped)
    with pytest.raises(IntegrityError, match="do not open"):
        sites["s1"].masked_input(np.zeros(4, dtype=np.uint64), received)


def test_masked_vector_validation() -> None:
    params = SecAggParams("r8", ("a", "b"), 2, 3, 8)
    server, _sites = run_round(params, _inputs(params, 4), {"a": "submit", "b": "submit"})
    assert server.phase is SecAggPhase.ABORTED  # nobody submitted
    fresh = SecAggParams("r9", ("a", "b", "c"), 2, 3, 8)
    ids = identities(fresh.site_ids)
    public = {s: raw_public(k) for s, k in ids.items()}
    srv = ServerSession(fresh, now=0.0, phase_timeout_s=10.0)
    sess = {s: SiteSession(fresh, s, ids[s]) for s in fresh.site_ids}
    for s in fresh.site_ids:
        srv.advertise(sess[s].advertise(), public[s], now=0.0)
    for s in fresh.site_ids:
        srv.share(s, sess[s].share_keys(srv.keys_for(s, now=0.0) or {}, public), now=0.0)
    for values, match in [
        (np.zeros(2, dtype=np.uint64), "shape"),
        (np.zeros(3, dtype=np.float64), "dtype"),
        (np.full(3, 256, dtype=np.uint64), "outside the field"),
    ]:
        with pytest.raises(IntegrityError, match=match):
            srv.submit("a", values, now=0.0)
    assert srv.submitted == ()
    with pytest.raises(IntegrityError, match="outside"):
        sess["a"].masked_input(np.full(3, 300, dtype=np.uint64), srv.shares_for("a", now=0.0) or ())


def test_params_validation() -> None:
    with pytest.raises(ConfigurationError, match="more than half"):
        SecAggParams("r", ("a", "b", "c", "d"), 2, 4, BITS)
    with pytest.raises(ConfigurationError, match="even"):
        SecAggParams("r", tuple("abcdefgh"), 5, 4, BITS, degree=3)
    with pytest.raises(ConfigurationError, match="distinct"):
        SecAggParams("r", ("a", "a", "b"), 2, 4, BITS)
    assert default_threshold(3) == 3
    assert default_threshold(10) == 7
    assert default_threshold(100) == 67


def test_withdrawn_site_counts_as_dropped() -> None:
    params = SecAggParams("r10", ("a", "b", "c", "d"), 3, 4, BITS)
    ids = identities(params.site_ids)
    public = {s: raw_public(k) for s, k in ids.items()}
    server = ServerSession(params, now=0.0, phase_timeout_s=10.0)
    server.withdraw("d", "budget spent", now=0.0)
    sessions = {s: SiteSession(params, s, ids[s]) for s in "abc"}
    for s in "abc":
        server.advertise(sessions[s].advertise(), public[s], now=0.5)
    # Closed without waiting for the deadline: d withdrew.
    assert server.phase is SecAggPhase.SHARING
    with pytest.raises(StaleRoundError, match="withdrew"):
        server.advertise(SiteSession(params, "d", ids["d"]).advertise(), public["d"], now=0.5)


def test_a_resubmitted_vector_is_a_duplicate_even_after_collecting_closed() -> None:
    # A site retrying a submission whose reply it lost learns that the first one counted.
    params = SecAggParams("r11", ("a", "b", "c"), 2, 4, BITS)
    ids = identities(params.site_ids)
    public = {s: raw_public(k) for s, k in ids.items()}
    inputs = _inputs(params, 11)
    server = ServerSession(params, now=0.0, phase_timeout_s=10.0)
    sites = {s: SiteSession(params, s, ids[s]) for s in params.site_ids}
    for s in params.site_ids:
        server.advertise(sites[s].advertise(), public[s], now=0.0)
    for s in params.site_ids:
        keys = server.keys_for(s, now=0.0)
        assert keys is not None
        server.share(s, sites[s].share_keys(keys, public), now=0.0)
    masked = {}
    for s in params.site_ids:
        received = server.shares_for(s, now=0.0)
        assert received is not None
        masked[s] = sites[s].masked_input(inputs[s], received)
        server.submit(s, masked[s], now=0.0)
    assert server.phase is SecAggPhase.UNMASKING  # the last submission closed the phase
    with pytest.raises(DuplicateSubmissionError):
        server.submit("c", masked["c"], now=0.0)
    for s in params.site_ids:
        request = server.unmask_request(s, now=0.0)
        assert request is not None
        server.unmask(s, sites[s].unmask(request.survivors, request.dropped), now=0.0)
    assert server.phase is SecAggPhase.COMPLETE
    np.testing.assert_array_equal(server.result(), _plain_sum(params, inputs, params.site_ids))
