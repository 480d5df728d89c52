"""Every wire message round-trips through fedlens.wire unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlens import wire
from fedlens.errors import IntegrityError
from fedlens.secagg_types import EncryptedShare, RevealedShare, ShareKind, SignedKeys
from fedlens.types import (
    MaskedSubmission,
    PrivacyCost,
    Release,
    ReleasedValue,
    ReleaseSummary,
    RoundPhase,
    RoundSpec,
    RoundStatus,
)
from fedlens.v1 import aggregation_pb2

text = st.text(max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
ids = st.lists(text, max_size=5).map(tuple)
params = st.dictionaries(text, text, max_size=3)

costs = st.builds(PrivacyCost, site_id=text, epsilon=finite, delta=finite, epsilon_total=finite)
specs = st.builds(
    RoundSpec,
    round_id=text,
    kind=text,
    site_ids=ids,
    length=st.integers(0, 2**32 - 1),
    bits=st.integers(0, 2**32 - 1),
    scale=finite,
    clip_bound=finite,
    labels=ids,
    phase_timeout_s=finite,
    params=params,
    threshold=st.integers(0, 2**32 - 1),
    degree=st.integers(0, 2**32 - 1),
    noise=st.sampled_from(["local", "distributed"]),
    colluding=st.integers(0, 2**32 - 1),
)
statuses = st.builds(
    RoundStatus,
    round_id=text,
    phase=st.sampled_from(list(RoundPhase)),
    advertised=ids,
    submitted=ids,
    release_id=text,
    reason=text,
    shared=ids,
    unmasked=ids,
    seconds_left=finite,
)
keys = st.builds(
    SignedKeys,
    round_id=text,
    site_id=text,
    cipher_public=st.binary(max_size=40),
    mask_public=st.binary(max_size=40),
    signature=st.binary(max_size=70),
)
sealed = st.lists(
    st.builds(
        EncryptedShare,
        round_id=st.just("r"),
        sender=text,
        receiver=text,
        ciphertext=st.binary(max_size=200),
    ),
    max_size=4,
).map(tuple)
revealed = st.lists(
    st.builds(
        RevealedShare,
        round_id=st.just("r"),
        sender=st.just("s"),
        owner=text,
        kind=st.sampled_from(list(ShareKind)),
        share=st.binary(max_size=70),
    ),
    max_size=4,
).map(tuple)
submissions = st.builds(
    MaskedSubmission,
    round_id=text,
    site_id=text,
    values=st.lists(st.integers(0, 2**64 - 1), max_size=20).map(
        lambda v: np.array(v, dtype=np.uint64)
    ),
    cost=costs,
    noise_std=finite,
)
values = st.builds(ReleasedValue, name=text, value=finite, noise_std=finite)
releases = st.builds(
    Release,
    release_id=text,
    round_id=text,
    kind=text,
    created_at=text,
    noised_count=finite,
    values=st.lists(values, max_size=4).map(tuple),
    grouped=st.lists(values, max_size=4).map(tuple),
    costs=st.lists(costs, max_size=3).map(tuple),
    params=params,
)
summaries = st.builds(
    ReleaseSummary,
    release_id=text,
    round_id=text,
    kind=text,
    created_at=text,
    num_sites=st.integers(0, 2**32 - 1),
)

PAIRS = [
    (costs, wire.privacy_cost_to_proto, wire.privacy_cost_from_proto),
    (specs, wire.round_spec_to_proto, wire.round_spec_from_proto),
    (statuses, wire.round_status_to_proto, wire.round_status_from_proto),
    (submissions, wire.masked_submission_to_proto, wire.masked_submission_from_proto),
    (releases, wire.release_to_proto, wire.release_from_proto),
    (summaries, wire.release_summary_to_proto, wire.release_summary_from_proto),
]


@pytest.mark.parametrize(("strategy", "to_proto", "from_proto"), PAIRS, ids=lambda p: "")
def test_round_trip(strategy, to_proto, from_proto) -> None:  # type: ignore[no-untyped-def]
    @given(strategy)
    def check(obj: object) -> None:
        msg = to_proto(obj)
        # Through bytes too: what a peer actually receives.
        again = type(msg).FromString(msg.SerializeToString())
        assert from_proto(again) == obj

    check()


def test_unknown_phase_is_an_integrity_error() -> None:
    msg = aggregation_pb2.RoundStatus(round_id="r", phase=aggregation_pb2.ROUND_PHASE_UNSPECIFIED)
    with pytest.raises(IntegrityError, match="unknown phase"):
        wire.round_status_from_proto(msg)


@given(keys, st.binary(min_size=32, max_size=32))
def test_signed_keys_round_trip_with_the_identity(k: SignedKeys, identity: bytes) -> None:
    msg = aggregation_pb2.SignedKeys.FromString(
        wire.signed_keys_to_proto(k, identity).SerializeToString()
    )
    assert wire.signed_keys_from_proto(k.round_id, msg) == k
    assert msg.identity_public == identity


@given(sealed)
def test_sealed_shares_round_trip(shares: tuple[EncryptedShare, ...]) -> None:
    request = aggregation_pb2.ShareKeysRequest(shares=wire.sealed_shares_to_proto(shares))
    again = aggregation_pb2.ShareKeysRequest.FromString(request.SerializeToString())
    assert wire.sealed_shares_from_proto("r", again.shares) == shares


@given(revealed)
def test_revealed_shares_round_trip(shares: tuple[RevealedShare, ...]) -> None:
    request = aggregation_pb2.UnmaskRequest(shares=wire.revealed_shares_to_proto(shares))
    again = aggregation_pb2.UnmaskRequest.FromString(request.SerializeToString())
    assert wire.revealed_shares_from_proto("r", "s", again.shares) == shares


def test_torn_masked_values_are_an_integrity_error() -> None:
    msg = aggregation_pb2.SubmitMaskedRequest(round_id="r", site_id="s", values=b"\x00" * 9)
    with pytest.raises(IntegrityError, match="whole uint64"):
        wire.masked_submission_from_proto(msg)
