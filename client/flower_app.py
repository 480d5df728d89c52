"""The fedlens Flower ClientApp: decode, call :class:`client.site.Site`, encode.

Message types: ``train`` (a FedAvg round of DP-SGD) and ``query.explain`` (an explanation
round). A refusal (budget, bad configuration) raises, and Flower returns it to the
coordinator as an error reply carrying the message. ``query.explain`` replies with a
status only: the explanation itself goes to the aggregator, masked.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.explanation import ExplainRequest
from client.site import Site
from client.site_config import SiteConfig
from fedlens.errors import ConfigurationError
from fedlens.runconfig import RunConfig

__all__ = ["app", "explain_request_from_config"]

app = ClientApp()

T = TypeVar("T")


def _field(record: ConfigRecord, key: str, kind: type[T]) -> T:
    """``record[key]`` as ``kind``, or a ConfigurationError naming the key."""
    if key not in record:
        raise ConfigurationError(f"message config lacks {key!r}")
    value: object = record[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind):
        raise ConfigurationError(
            f"message config {key!r} must be {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _config(msg: Message) -> ConfigRecord:
    record = msg.content.config_records.get("config")
    if record is None:
        raise ConfigurationError(f"{msg.metadata.message_type} message has no 'config' record")
    return record


def _arrays(msg: Message) -> ArrayRecord:
    record = msg.content.array_records.get("arrays")
    if record is None:
        raise ConfigurationError(f"{msg.metadata.message_type} message has no 'arrays' record")
    return record


def _optional(record: ConfigRecord, key: str, kind: type[T], default: T) -> T:
    """``record[key]`` as ``kind`` if present (a ConfigurationError names it if mistyped)."""
    return _field(record, key, kind) if key in record else default


def explain_request_from_config(
    cfg: ConfigRecord, public: ArrayRecord | None = None
) -> ExplainRequest:
    """The coordinator's ``query.explain`` configuration, validated, with its public arrays."""
    try:
        site_ids = tuple(json.loads(_field(cfg, "site-ids", str)))
        params = json.loads(_field(cfg, "params", str))
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"message config holds malformed JSON: {exc}") from None
    return ExplainRequest(
        round_id=_field(cfg, "round-id", str),
        kind=_field(cfg, "kind", str),
        site_ids=site_ids,
        aggregator=_field(cfg, "aggregator", str),
        epsilon=_field(cfg, "epsilon", float),
        delta=_field(cfg, "delta", float),
        clip_bound=_field(cfg, "clip-bound", float),
        bits=_field(cfg, "bits", int),
        scale=_field(cfg, "scale", float),
        timeout_s=_field(cfg, "timeout", float),
        params={str(k): str(v) for k, v in params.items()},
        threshold=_optional(cfg, "threshold", int, 0),
        degree=_optional(cfg, "degree", int, 0),
        noise=_optional(cfg, "noise", str, "local"),
        colluding=_optional(cfg, "colluding", int, 0),
        public={k: v.numpy() for k, v in public.items()} if public is not None else {},
    )


def _site(context: Context) -> Site:
    return Site(
        RunConfig.from_flower(context.run_config), SiteConfig.from_flower(context.node_config)
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = _site(context)
    server_round = _field(_config(msg), "server-round", int)
    outcome = site.train(_arrays(msg).to_torch_state_dict(), server_round, now=datetime.now(UTC))
    content = RecordDict(
        {
            "arrays": ArrayRecord(outcome.state),
            # Every site weighs the same in FedAvg: a record count is not DP.
            "metrics": MetricRecord({"weight": 1, "epsilon-total": outcome.epsilon_total}),
            "site": ConfigRecord({"site-name": site.name}),
            # The whole ledger, for the coordinator's mirror (it holds no record data).
            "ledger": ConfigRecord({"json": json.dumps(site.ledger_snapshot().to_dict())}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query("explain")
def explain(msg: Message, context: Context) -> Message:
    site = _site(context)
    request = explain_request_from_config(_config(msg), msg.content.array_records.get("public"))
    outcome = site.explain(request, _arrays(msg).to_torch_state_dict(), now=datetime.now(UTC))
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"epsilon-total": outcome.cost.epsilon_total, "noise-std": outcome.noise_std}
            ),
            "status": ConfigRecord({"site-name": site.name, "phase": outcome.status.phase.value}),
            "ledger": ConfigRecord({"json": json.dumps(site.ledger_snapshot().to_dict())}),
        }
    )
    return Message(content=content, reply_to=msg)
