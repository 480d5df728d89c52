"""SecAgg+ neighbour graph: shape, determinism, agreement with the written derivation."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Mapping

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError
from privacy import neighbourhoods, recommended_degree, share_threshold

Graph = Mapping[str, frozenset[str]]

site_lists = st.lists(st.text(min_size=1, max_size=6), min_size=2, max_size=40, unique=True)


def connected(graph: Graph, removed: Iterable[str] = ()) -> bool:
    left = set(graph) - set(removed)
    start = next(iter(left))
    seen, frontier = {start}, [start]
    while frontier:
        for peer in graph[frontier.pop()]:
            if peer in left and peer not in seen:
                seen.add(peer)
                frontier.append(peer)
    return seen == left


# -- an independent reading of the derivation in privacy/secagg_graph.py (RFC 5869 HKDF) ---


def reference_ring(site_ids: list[str], seed: bytes) -> list[str]:
    prk = hmac.new(bytes(32), seed, hashlib.sha256).digest()
    key = hmac.new(prk, b"fedlens/v2 neighbour-graph" + b"\x01", hashlib.sha256).digest()
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * (64 * len(site_ids) + 64)))
    words = (int.from_bytes(stream[i : i + 8], "little") for i in range(0, len(stream), 8))
    order = sorted(site_ids, key=lambda s: s.encode("utf-8"))
    for i in range(len(order) - 1, 0, -1):
        word = next(words)
        while word >= 2**64 - 2**64 % (i + 1):
            word = next(words)
        j = word % (i + 1)
        order[i], order[j] = order[j], order[i]
    return order


def reference_graph(site_ids: list[str], degree: int, seed: bytes) -> dict[str, set[str]]:
    ring = reference_ring(site_ids, seed)
    n = len(ring)
    graph: dict[str, set[str]] = {s: set() for s in ring}
    for i, site in enumerate(ring):
        for offset in range(1, degree // 2 + 1):
            graph[site].add(ring[(i + offset) % n])
            graph[ring[(i + offset) % n]].add(site)
    return graph


# -- shape ---------------------------------------------------------------------------------


@given(site_lists, st.integers(-3, 45), st.binary(min_size=1, max_size=32))
def test_graph_is_symmetric_regular_and_connected(ids: list[str], degree: int, seed: bytes) -> None:
    n = len(ids)
    complete = degree <= 0 or degree >= n - 1
    if not complete and degree % 2:
        with pytest.raises(ConfigurationError, match="even"):
            neighbourhoods(ids, degree, seed)
        return
    graph = neighbourhoods(ids, degree, seed)
    assert list(graph) == ids
    expected = n - 1 if complete else degree
    for site, peers in graph.items():
        assert site not in peers
        assert len(peers) == expected
        assert peers <= set(ids)
        for peer in peers:
            assert site in graph[peer]
    assert connected(graph)


@given(site_lists, st.integers(1, 20).map(lambda k: 2 * k), st.binary(min_size=1, max_size=32))
def test_graph_matches_the_written_derivation(ids: list[str], degree: int, seed: bytes) -> None:
    if degree >= len(ids) - 1:
        degree = 2 if len(ids) > 3 else 0
    graph = neighbourhoods(ids, degree, seed)
    if degree:
        assert {k: set(v) for k, v in graph.items()} == reference_graph(ids, degree, seed)


def test_known_answer_graph() -> None:
    # Pinned so that every release computes the same graph from the same seed.
    graph = neighbourhoods(list("abcdefg"), 2, bytes(32))
    assert {k: "".join(sorted(v)) for k, v in graph.items()} == {
        "a": "de",
        "b": "cg",
        "c": "bf",
        "d": "ag",
        "e": "af",
        "f": "ce",
        "g": "bd",
    }
    assert reference_ring([str(i) for i in range(10)], b"fedlens") == list("2369715840")


@settings(max_examples=30)
@given(site_lists, st.binary(min_size=1, max_size=32), st.randoms(use_true_random=False))
def test_graph_depends_on_the_seed_not_on_the_input_order(
    ids: list[str], seed: bytes, rnd: random.Random
) -> None:
    shuffled = list(ids)
    rnd.shuffle(shuffled)
    degree = 2 if len(ids) > 3 else 0
    assert neighbourhoods(ids, degree, seed) == neighbourhoods(shuffled, degree, seed)


def test_different_seeds_give_different_graphs() -> None:
    ids = [f"site-{i:02d}" for i in range(30)]
    graphs = [neighbourhoods(ids, 4, f"round-{r}".encode()) for r in range(10)]
    distinct = {tuple(sorted((k, tuple(sorted(v))) for k, v in g.items())) for g in graphs}
    assert len(distinct) == len(graphs)


def test_rings_are_uniform_over_seeds() -> None:
    # Four sites and degree 2 give one of the 3 distinct 4-cycles; each should be drawn
    # about 200 times in 600 seeds (standard deviation about 11.5).
    counts = Counter(
        frozenset(
            (site, frozenset(peers))
            for site, peers in neighbourhoods(list("wxyz"), 2, r.to_bytes(4, "big")).items()
        )
        for r in range(600)
    )
    assert len(counts) == 3
    assert all(150 <= count <= 250 for count in counts.values())


@pytest.mark.parametrize("n, degree", [(9, 4), (10, 4), (11, 6), (12, 2)])
def test_harary_graph_survives_removing_fewer_than_degree_sites(n: int, degree: int) -> None:
    ids = [f"s{i}" for i in range(n)]
    graph = neighbourhoods(ids, degree, b"connectivity")
    for removed in itertools.combinations(ids, degree - 1):
        assert connected(graph, removed)


@pytest.mark.parametrize("degree", [-1, 0, 4, 5, 100])
def test_complete_graph_cases(degree: int) -> None:
    ids = ["u", "v", "w", "x", "y"]
    graph = neighbourhoods(ids, degree, b"seed")
    assert graph == {s: frozenset(ids) - {s} for s in ids}


def test_two_sites_are_each_others_neighbours() -> None:
    assert neighbourhoods(["b", "a"], 2, b"s") == {"b": frozenset("a"), "a": frozenset("b")}


@pytest.mark.parametrize(
    "ids, degree, seed, match",
    [
        (["a", "b", "a", "c"], 2, b"s", "distinct"),
        (["a"], 0, b"s", "at least 2"),
        ([], 0, b"s", "at least 2"),
        (list("abcdef"), 3, b"s", "even"),
        (list("abcdef"), 2, b"", "seed"),
        (list("abcdef"), 2, "seed", "seed"),
        (list("abcdef"), True, b"s", "degree"),
        (["a", 1], 0, b"s", "strings"),
        (["a", "b", "\ud800", "c", "d"], 2, b"s", "UTF-8"),
    ],
)
def test_neighbourhoods_rejects_bad_settings(
    ids: list[str], degree: int, seed: bytes, match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        neighbourhoods(ids, degree, seed)


# -- degree and threshold -------------------------------------------------------------------


def test_recommended_degree_is_complete_for_small_rounds() -> None:
    assert [recommended_degree(n) for n in (2, 3, 10, 50, 173)] == [1, 2, 9, 49, 172]


def test_recommended_degree_grows_logarithmically() -> None:
    assert recommended_degree(10**4) == 306  # Bell et al.: about 3% of 10**4 clients
    assert recommended_degree(10**6) == 460
    assert recommended_degree(10**9) == 688
    degrees = [recommended_degree(n) for n in range(174, 5000)]
    assert all(d % 2 == 0 for d in degrees)
    assert degrees == sorted(degrees)


def test_recommended_degree_is_accepted_by_neighbourhoods() -> None:
    for n in [*range(2, 40), 173, 174, 175, 260]:
        ids = [str(i) for i in range(n)]
        degree = recommended_degree(n)
        graph = neighbourhoods(ids, degree, b"round")
        assert all(len(peers) == degree for peers in graph.values())


@pytest.mark.parametrize("n", [1, 0, -5, True, 2.0])
def test_recommended_degree_rejects_bad_sizes(n: int) -> None:
    with pytest.raises(ConfigurationError, match="num_sites"):
        recommended_degree(n)


def test_share_threshold_is_the_smallest_strict_majority() -> None:
    assert [share_threshold(c) for c in range(2, 9)] == [2, 2, 3, 3, 4, 4, 5]
    for closed_size in range(2, 2000):
        t = share_threshold(closed_size)
        # Two disjoint groups of t honest holders cannot exist; t - 1 would allow them.
        assert 2 * t > closed_size >= 2 * (t - 1)
        assert t <= closed_size


@pytest.mark.parametrize("closed_size", [1, 0, -1, True, 3.0])
def test_share_threshold_rejects_bad_sizes(closed_size: int) -> None:
    with pytest.raises(ConfigurationError, match="closed_size"):
        share_threshold(closed_size)
