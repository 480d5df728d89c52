"""A real coordinator gRPC server on a loopback port, over a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    store = Store(f"sqlite:///{tmp_path / 'fedlens.db'}")
    aggregator = Aggregator(store)
    running = serve(aggregator, QueryHandler(store))
    coord = Coordinator(store, aggregator, running)
    try:
        yield coord
    finally:
        coord.channel.close()
        running.stop(grace=None)
        store.close()
