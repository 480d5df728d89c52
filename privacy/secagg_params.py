"""What the sites and the aggregator of a secure-aggregation round agree on.

A round has ``n`` expected sites and a ``threshold``: the sum is revealed only if at least
``threshold`` sites' inputs are in it, and the round aborts, revealing nothing, below that.
``threshold`` must exceed ``n / 2``: each site's secrets are Shamir-shared with a strict
majority threshold, so an aggregator that tells different sites different stories cannot
gather both halves (self-mask seed and mask key) of one site's secrets from honest sites,
which reveal only one of the two per peer.

With ``degree = 0`` every pair of sites masks (the complete graph of Bonawitz et al. 2017)
and the Shamir threshold is ``threshold``. With an even ``degree`` below ``n - 1``, sites
mask and share only with their neighbours in a Harary graph on a permutation drawn from
the round id (SecAgg+, Bell et al. CCS 2020), and the Shamir threshold within a site's
closed neighbourhood is a strict majority of it; work per site then grows with the degree,
O(log n), instead of with n.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

from fedlens.errors import ConfigurationError
from fedlens.types import RoundSpec, default_threshold
from privacy import secagg_graph
from privacy.fixedpoint import MAX_BITS

__all__ = ["SecAggParams", "default_threshold"]

MAX_SITES = 65535
"""Shamir x-coordinates are 16 bits: one per site, its 1-based position in the round."""


@dataclass(frozen=True)
class SecAggParams:
    """Parameters of one round; both sides build the same object from the round spec.

    Attributes
    ----------
    site_ids
        The expected sites, in the order that fixes their Shamir x-coordinates.
    threshold
        Least number of inputs the revealed sum may contain; ``n/2 < threshold <= n``.
    degree
        0 for the complete graph, else the even SecAgg+ neighbour degree.
    length, bits
        Vector length and modulus exponent of the masked vectors.
    """

    round_id: str
    site_ids: tuple[str, ...]
    threshold: int
    length: int
    bits: int
    degree: int = 0

    def __post_init__(self) -> None:
        n = len(self.site_ids)
        if not self.round_id:
            raise ConfigurationError("round_id must not be empty")
        if n < 2 or n > MAX_SITES:
            raise ConfigurationError(f"a round needs 2 to {MAX_SITES} sites, got {n}")
        if len(set(self.site_ids)) != n:
            raise ConfigurationError("site_ids must be distinct")
        for site in self.site_ids:
            if not site or "\x00" in site:
                raise ConfigurationError(f"site id {site!r} is empty or contains NUL")
        if not n / 2 < self.threshold <= n:
            raise ConfigurationError(
                f"threshold must be more than half the sites and at most all of them "
                f"({n // 2 + 1}..{n} for {n} sites), got {self.threshold}"
            )
        if self.length < 1:
            raise ConfigurationError(f"length must be >= 1, got {self.length}")
        if not 1 < self.bits <= MAX_BITS:
            raise ConfigurationError(f"bits must be in [2, {MAX_BITS}], got {self.bits}")
        if self.degree < 0 or (0 < self.degree < n - 1 and self.degree % 2):
            raise ConfigurationError(
                f"degree must be 0 (complete graph) or an even number, got {self.degree}"
            )

    @classmethod
    def for_round(cls, spec: RoundSpec) -> SecAggParams:
        """The parameters of a round spec; the aggregator and every site derive the same."""
        return cls(
            round_id=spec.round_id,
            site_ids=tuple(spec.site_ids),
            threshold=spec.effective_threshold,
            length=spec.length,
            bits=spec.bits,
            degree=spec.degree,
        )

    @property
    def complete(self) -> bool:
        return self.degree == 0 or self.degree >= len(self.site_ids) - 1

    @cached_property
    def neighbours(self) -> dict[str, frozenset[str]]:
        """Each site's neighbours (never itself), the same for every party."""
        seed = hashlib.sha256(b"fedlens/v2 graph " + self.round_id.encode()).digest()
        degree = 0 if self.complete else self.degree
        return secagg_graph.neighbourhoods(self.site_ids, degree, seed)

    @cached_property
    def x_coordinate(self) -> dict[str, int]:
        return {site: index + 1 for index, site in enumerate(self.site_ids)}

    def closed(self, site_id: str) -> frozenset[str]:
        """The site and its neighbours."""
        return self.neighbours[site_id] | {site_id}

    def share_threshold(self, site_id: str) -> int:
        """Shares needed to rebuild a secret of ``site_id``."""
        if self.complete:
            return self.threshold
        return secagg_graph.share_threshold(len(self.closed(site_id)))
