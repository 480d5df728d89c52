"""A real coordinator gRPC server on a loopback port, over a real store.

The store is a SQLite file; a test marked ``both_backends`` runs a second time over a
PostgreSQL database (``database_url`` in ``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from fedlens.v1 import aggregation_pb2_grpc, query_pb2_grpc
from server.aggregation import Aggregator, QueryHandler
from server.grpc_server import RunningServer, serve
from server.storage import Store


class Coordinator:
    def __init__(self, store: Store, aggregator: Aggregator, running: RunningServer) -> None:
        self.store = store
        self.aggregator = aggregator
        self.running = running
        self.channel = grpc.insecure_channel(running.address)
        self.aggregation = aggregation_pb2_grpc.AggregationStub(self.channel)
        self.query = query_pb2_grpc.QueryStub(self.channel)


@pytest.fixture
def coordinator(database_url: str) -> Iterator[Coordinator]:
    store = Store(database_url)
    aggregator = Aggregator(store)
    running = serve(aggregator, QueryHandler(store))
    coord = Coordinator(store, aggregator, running)
    try:
        yield coord
    finally:
        coord.channel.close()
        running.stop(grace=None)
        store.close()
