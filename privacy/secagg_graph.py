"""Who masks and shares with whom: the SecAgg+ neighbour graph (Bell et al., CCS 2020).

In the secure aggregation of Bonawitz et al. (CCS 2017) every site masks with, and
secret-shares its keys to, every other site, which costs each site ``O(n)``. Bell,
Bonawitz, Gascón, Lepoint and Raykova ("Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) replace the complete graph by a sparse graph of
degree ``k = O(log n)``: a site masks only with its neighbours and shares its keys only
among them, and the masks still cancel because every pairwise mask is added by one end of
its edge and subtracted by the other.

The graph here is a Harary graph ``H(k, n)`` laid on a pseudo-random ring of the sites, as
in the practical SecAgg+ deployments: every site is adjacent to the ``k / 2`` nearest sites
on each side of the ring. ``H(k, n)`` is ``k``-regular and ``k``-vertex-connected. The
ring order comes from the public round seed, so every party computes the same graph and
the aggregator cannot place sites of its choice next to a victim. Derivation::

    order  = site ids sorted by their UTF-8 bytes
    key    = HKDF-SHA256(seed, length=32, salt=None, info=b"fedlens/v2 neighbour-graph")
    stream = ChaCha20(key, nonce=16 zero bytes) keystream, read as little-endian uint64 words
    for i = n-1 down to 1:                       # Fisher–Yates
        draw words w until w < 2**64 - (2**64 mod (i+1)); j = w mod (i+1)
        swap order[i], order[j]

The empty salt is RFC 5869's default; the seed is already the per-round value.

Assumptions: the seed is fixed after the set of sites is (for example a hash of the round
id and the advertised keys), so the aggregator cannot grind seeds; corrupted sites are
chosen independently of the seed. Bell et al. analyse a random graph ``G(n, k/(n-1))``;
the Harary ring on a uniformly random permutation is the standard engineering substitute
and is at least as well connected, but their bounds are proved for the former.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlens.errors import ConfigurationError

__all__ = [
    "DEGREE_PER_LOG2_SITES",
    "GRAPH_INFO_LABEL",
    "neighbourhoods",
    "recommended_degree",
    "share_threshold",
]

GRAPH_INFO_LABEL = b"fedlens/v2 neighbour-graph"
"""HKDF ``info`` of the key that drives the shuffle of the ring."""

DEGREE_PER_LOG2_SITES = 23
"""Neighbours per bit of ``n`` in :func:`recommended_degree` (see there)."""

_CHACHA_NONCE = bytes(16)
_WORD_BYTES = 8
_WORDS_PER_BLOCK = 64
_WORD_RANGE = 1 << 64


def neighbourhoods(site_ids: Sequence[str], degree: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each site's neighbours in the round's graph; a site is never its own neighbour.

    Parameters
    ----------
    site_ids
        The ``n >= 2`` distinct sites of the round, in any order (the result does not
        depend on it).
    degree
        ``k``, the number of neighbours of every site. ``k <= 0`` or ``k >= n - 1`` gives
        the complete graph (Bonawitz et al. 2017); otherwise ``k`` must be even and the
        graph is the Harary graph ``H(k, n)`` on the seeded ring.
    seed
        The public round seed, non-empty bytes. Equal seeds give equal graphs.

    Returns
    -------
    dict[str, frozenset[str]]
        Site id to its neighbours, for every site in ``site_ids`` (in that order). The
        relation is symmetric: ``v in result[u]`` if and only if ``u in result[v]``.

    Raises
    ------
    ConfigurationError
        Fewer than two sites, a repeated id or one that is not a string, an odd ``degree``
        strictly between 0 and ``n - 1``, or a seed that is not non-empty bytes.
    """
    ids = list(site_ids)
    for site_id in ids:
        if not isinstance(site_id, str):
            raise ConfigurationError(f"site ids must be strings, got {site_id!r}")
    if len(ids) < 2:
        raise ConfigurationError(f"a neighbour graph needs at least 2 sites, got {len(ids)}")
    if len(set(ids)) != len(ids):
        repeated = sorted({site_id for site_id in ids if ids.count(site_id) > 1})
        raise ConfigurationError(f"site ids must be distinct; repeated: {repeated}")
    if isinstance(degree, bool) or not isinstance(degree, int):
        raise ConfigurationError(f"degree must be an integer, got {degree!r}")
    if not isinstance(seed, bytes | bytearray) or not seed:
        raise ConfigurationError("seed must be non-empty bytes")
    n = len(ids)
    if degree <= 0 or degree >= n - 1:
        everyone = frozenset(ids)
        return {site_id: everyone - {site_id} for site_id in ids}
    if degree % 2:
        raise ConfigurationError(
            f"degree must be even (a Harary graph has degree/2 neighbours on each side of "
            f"the ring) or outside [1, {n - 2}] for the complete graph, got {degree}"
        )
    ring = _seeded_ring(ids, bytes(seed))
    half = degree // 2
    position = {site_id: index for index, site_id in enumerate(ring)}
    result = {}
    for site_id in ids:
        at = position[site_id]
        result[site_id] = frozenset(
            ring[(at + step) % n] for offset in range(1, half + 1) for step in (offset, -offset)
        )
    return result


def recommended_degree(num_sites: int) -> int:
    """A neighbour count ``k`` that grows as ``O(log n)``, after Bell et al. (CCS 2020).

    ``k`` is the smallest even integer ``>= 23 * log2(n)``, or ``n - 1`` (the complete
    graph) when that is not larger.

    The constant is calibrated on the concrete figure Bell et al. state for their
    semi-malicious protocol: with ``n = 10**4`` clients, up to 5% of them corrupted and
    colluding with the server (``γ = 0.05``) and up to 5% dropping out (``δ = 0.05``),
    each client needs about 3% of the others as neighbours, ``k ≈ 300``; ``23 * log2(10**4)
    ≈ 306``. Their bounds (at statistical security ``σ = 40`` and correctness ``η = 30``)
    need ``k`` to grow with ``log n`` plus terms in ``σ`` and ``η``, and grow further as
    ``γ`` and ``δ`` rise, so this rule assumes ``γ, δ <= 0.05``; for larger fractions take
    the paper's tables. Scaling a single calibration point by ``log2 n`` is an
    extrapolation away from ``10**4``; it stays within the paper's other headline figure
    (their semi-honest protocol serves ``10**9`` clients at the per-client cost Bonawitz et
    al. pay for ``10**3``; here ``k(10**9) = 688``). Up to 173 sites the rule returns the
    complete graph, which is what cross-silo rounds of a few dozen sites use.

    Parameters
    ----------
    num_sites
        ``n >= 2``.

    Returns
    -------
    int
        An even degree in ``[2, n - 2]`` for :func:`neighbourhoods`, or ``n - 1`` (odd when
        ``n`` is even) meaning the complete graph.

    Raises
    ------
    ConfigurationError
        ``num_sites`` is not an integer ``>= 2``.
    """
    if isinstance(num_sites, bool) or not isinstance(num_sites, int) or num_sites < 2:
        raise ConfigurationError(f"num_sites must be an integer >= 2, got {num_sites!r}")
    degree = math.ceil(DEGREE_PER_LOG2_SITES * math.log2(num_sites))
    degree += degree % 2
    return min(degree, num_sites - 1)


def share_threshold(closed_size: int) -> int:
    """Shamir threshold inside a closed neighbourhood: ``floor(closed_size / 2) + 1``.

    A site ``u`` shares its self-mask seed ``b_u`` and its pairwise-mask key ``s_u`` among
    its closed neighbourhood (itself and its neighbours). When unmasking, the aggregator
    asks each holder for exactly one of the two: ``b_u`` if it says ``u`` survived, ``s_u``
    if it says ``u`` dropped out, and an honest holder answers only one of the two
    questions about ``u``. With ``b_u`` and ``s_u`` together the aggregator could strip
    every mask from ``u``'s submission and read its input. To get both it would have to
    tell one group of holders that ``u`` survived and another that it dropped, and collect
    ``t`` answers from each: ``2t`` honest holders. A strict majority makes ``2t >
    closed_size``, so no such split exists (Bonawitz et al. 2017, §4; Bell et al. 2020,
    §3).

    Assumptions: the holders are honest. If ``c`` holders collude with the aggregator they
    can answer both questions, and the threshold must exceed ``(closed_size + c) / 2``
    instead (which gives the ``2n/3`` of Bonawitz et al. for ``c = n/3``). Unmasking needs
    ``t`` holders to remain, so a neighbourhood tolerates fewer than half of it dropping.

    Parameters
    ----------
    closed_size
        Size of the closed neighbourhood, ``degree + 1``, at least 2.

    Returns
    -------
    int
        ``t`` with ``closed_size < 2t <= closed_size + 2``.

    Raises
    ------
    ConfigurationError
        ``closed_size`` is not an integer ``>= 2``.
    """
    if isinstance(closed_size, bool) or not isinstance(closed_size, int) or closed_size < 2:
        raise ConfigurationError(f"closed_size must be an integer >= 2, got {closed_size!r}")
    return closed_size // 2 + 1


def _seeded_ring(site_ids: Sequence[str], seed: bytes) -> list[str]:
    """The sites in ring order: sorted by UTF-8 bytes, then shuffled by the seeded stream."""
    try:
        order = sorted(site_ids, key=lambda site_id: site_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ConfigurationError("site ids must be encodable as UTF-8") from exc
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=GRAPH_INFO_LABEL).derive(seed)
    stream = _WordStream(key)
    for i in range(len(order) - 1, 0, -1):
        j = stream.below(i + 1)
        order[i], order[j] = order[j], order[i]
    return order


class _WordStream:
    """Uniform integers from a ChaCha20 keystream read as little-endian uint64 words."""

    def __init__(self, key: bytes) -> None:
        self._encryptor = Cipher(algorithms.ChaCha20(key, _CHACHA_NONCE), mode=None).encryptor()
        self._buffer = b""
        self._offset = 0

    def _word(self) -> int:
        if self._offset == len(self._buffer):
            self._buffer = self._encryptor.update(bytes(_WORD_BYTES * _WORDS_PER_BLOCK))
            self._offset = 0
        word = int.from_bytes(self._buffer[self._offset : self._offset + _WORD_BYTES], "little")
        self._offset += _WORD_BYTES
        return word

    def below(self, bound: int) -> int:
        """Uniform in ``[0, bound)`` by rejecting the top ``2**64 mod bound`` words."""
        limit = _WORD_RANGE - _WORD_RANGE % bound
        while True:
            word = self._word()
            if word < limit:
                return word % bound
