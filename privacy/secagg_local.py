"""One secure-aggregation round with every party in this process, for simulations.

The real site and server state machines exchange their messages directly instead of over
gRPC: benchmarks use it to measure what the protocol adds to a release, and tests use it
to check the protocol under dropouts at every phase. A site listed in ``drop_before``
never reaches that phase, as if its process had died.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedlens.errors import DropoutError, StaleRoundError
from fedlens.secagg_types import SecAggPhase
from privacy.secagg_crypto import raw_public
from privacy.secagg_params import SecAggParams
from privacy.secagg_server import ServerSession
from privacy.secagg_site import SiteSession

PHASES = ("advertise", "share", "submit", "unmask")


__all__ = ["PHASES", "identities", "run_round"]


def identities(site_ids: tuple[str, ...]) -> dict[str, Ed25519PrivateKey]:
    """A fresh Ed25519 identity per site."""
    return {site: Ed25519PrivateKey.generate() for site in site_ids}


def run_round(
    params: SecAggParams,
    inputs: Mapping[str, np.ndarray],
    drop_before: Mapping[str, str] | None = None,
    *,
    timeout: float = 10.0,
) -> tuple[ServerSession, dict[str, SiteSession]]:
    """Run a whole round; ``drop_before[site]`` names the phase a site never reaches.

    Time advances past each phase's deadline whenever a site has dropped, so the server
    closes the phase with the sites that answered.
    """
    drop_before = dict(drop_before or {})
    ids = identities(params.site_ids)
    public = {site: raw_public(key) for site, key in ids.items()}
    server = ServerSession(params, now=0.0, phase_timeout_s=timeout)
    sites = {site: SiteSession(params, site, ids[site]) for site in params.site_ids}
    now = 0.0

    def active(phase: str) -> list[str]:
        stop = {site for site, p in drop_before.items() if PHASES.index(p) <= PHASES.index(phase)}
        return [site for site in params.site_ids if site not in stop]

    def settle() -> None:
        nonlocal now
        now = server.deadline + 0.001 if not server.phase.finished else now
        server.tick(now)

    for site in active("advertise"):
        server.advertise(sites[site].advertise(), public[site], now=now)
    if server.phase is SecAggPhase.ADVERTISING:
        settle()
    if server.phase.finished:
        return server, sites
    sharers = []
    for site in active("share"):
        keys = server.keys_for(site, now=now)
        if keys is None:
            raise StaleRoundError(f"round {params.round_id} did not reach the next phase")
        try:
            sealed = sites[site].share_keys(keys, public)
        except DropoutError:
            continue
        server.share(site, sealed, now=now)
        sharers.append(site)
    if server.phase is SecAggPhase.SHARING:
        settle()
    if server.phase.finished:
        return server, sites
    for site in active("submit"):
        if site not in sharers:
            continue
        received = server.shares_for(site, now=now)
        if received is None:
            raise StaleRoundError(f"round {params.round_id} did not reach the next phase")
        try:
            masked = sites[site].masked_input(inputs[site], received)
        except DropoutError:
            continue
        server.submit(site, masked, now=now)
    if server.phase is SecAggPhase.COLLECTING:
        settle()
    if server.phase.finished:
        return server, sites
    for site in active("unmask"):
        if site not in server.submitted:
            continue
        request = server.unmask_request(site, now=now)
        if request is None:
            raise StaleRoundError(f"round {params.round_id} did not reach the next phase")
        server.unmask(site, sites[site].unmask(request.survivors, request.dropped), now=now)
    if server.phase is SecAggPhase.UNMASKING:
        settle()
    return server, sites
