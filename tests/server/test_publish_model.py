"""PublishModel over real gRPC: the training run's model reaches the store, checked first."""

from __future__ import annotations

import io
import json

import grpc
import pytest
import torch

from fedlens.query_client import QueryClient
from fedlens.v1 import aggregation_pb2
from tests.explain.adult_model import complete_records, trained_state
from tests.server.conftest import Coordinator


def publish(coordinator: Coordinator, state: object, **fields: str) -> str:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    request = aggregation_pb2.PublishModelRequest(
        dataset=fields.get("dataset", "adult"),
        model=fields.get("model", "logistic"),
        state=buffer.getvalue(),
        params={"seed": "0", "rounds": "3"},
    )
    reply: aggregation_pb2.PublishModelResponse = coordinator.aggregation.PublishModel(request)
    return reply.model_id


def test_a_published_model_explains_analysts_inputs(coordinator: Coordinator) -> None:
    model_id = publish(coordinator, trained_state())
    stored = coordinator.store.get_model(model_id)
    assert stored.dataset == "adult" and stored.params["rounds"] == "3"
    record = {
        k: v if isinstance(v, str) else json.dumps(v) for k, v in complete_records(1)[0].items()
    }
    with QueryClient(coordinator.running.address) as client:
        result = client.explain_input(record, model_id=model_id)
    assert 0.0 <= result.probability <= 1.0 and result.card


@pytest.mark.parametrize(
    ("state", "fields", "problem"),
    [
        ("not a state dict", {}, "state dict of named tensors"),
        ({"linear.weight": torch.zeros(1, 3)}, {}, "do not fit logistic for adult"),
        ("nan", {}, "NaN or infinite values in linear.weight"),
        ("ok", {"model": "forest"}, "forest"),
        ("ok", {"dataset": "nope"}, "nope"),
    ],
)
def test_a_bad_model_is_refused_and_nothing_is_stored(
    coordinator: Coordinator, state: object, fields: dict[str, str], problem: str
) -> None:
    if state == "nan":
        state = {k: torch.full_like(v, float("nan")) for k, v in trained_state().items()}
    elif state == "ok":
        state = trained_state()
    with pytest.raises(grpc.RpcError) as err:
        publish(coordinator, state, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert problem in (err.value.details() or "")
    assert coordinator.store.dump().get("models", []) == []
    # Garbage bytes, not a torch file at all.
    bad = aggregation_pb2.PublishModelRequest(dataset="adult", model="logistic", state=b"\x00junk")
    with pytest.raises(grpc.RpcError) as err:
        coordinator.aggregation.PublishModel(bad)
    assert "do not load" in (err.value.details() or "")
