"""The fedlens Flower ClientApp: DP-SGD training and explanation rounds at a site.

Message types: ``train`` (FedAvg round) and ``query.explain`` (explanation round). Both
ask the site's ledger first and refuse work past the site's budget; the refusal comes
back to the coordinator as an error reply naming the budget. ``query.explain`` replies
with a status only: the explanation itself goes to the aggregator, masked.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TypeVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

from client.explanation import ExplainRequest, contribute_explanation
from client.ledger_store import LedgerStore
from client.site_config import SiteConfig
from client.training import planned_steps, train_dp
from fedlens.datasets import SiteData, load_dataset
from fedlens.errors import ConfigurationError
from fedlens.models import build_model
from fedlens.runconfig import RunConfig
from privacy import LedgerEvent, PrivacyLedger, SecureRandom, dpsgd_noise_multiplier

__all__ = ["app"]

logger = logging.getLogger(__name__)

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


def _site_data(run: RunConfig, site: SiteConfig) -> SiteData:
    dataset = load_dataset(run.dataset, seed=run.seed)
    return dataset.site(
        site.partition_id,
        site.num_partitions,
        partition=run.partition,
        alpha=run.alpha,
        seed=run.seed,
    )


def _model(run: RunConfig, dimension: int, arrays: ArrayRecord) -> nn.Module:
    model = build_model(run.model, dimension, seed=run.seed)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def _training_noise(site: SiteConfig, run: RunConfig, q: float, total_steps: int) -> float:
    """DP-SGD noise multiplier for the planned training, calibrated once per plan.

    Calibration is deterministic in its inputs, so the site keeps the result beside its
    ledger instead of recomputing it in every round's fresh process.
    """
    path = site.state_dir / "noise.json"
    key = f"{run.train_epsilon!r}:{site.delta!r}:{q!r}:{total_steps}"
    cache: dict[str, float] = json.loads(path.read_text()) if path.exists() else {}
    if key not in cache:
        cache[key] = dpsgd_noise_multiplier(run.train_epsilon, site.delta, q, total_steps)
        path.write_text(json.dumps(cache))
    return cache[key]


def _prepare(context: Context) -> tuple[RunConfig, SiteConfig]:
    run = RunConfig.from_flower(context.run_config)
    site = SiteConfig.from_flower(context.node_config)
    site.state_dir.mkdir(parents=True, exist_ok=True)
    if site.threads:
        torch.set_num_threads(site.threads)
    return run, site


def _ledger(site: SiteConfig) -> tuple[LedgerStore, PrivacyLedger]:
    store = LedgerStore(site.ledger_path)
    return store, store.load(site.epsilon, site.delta)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One FedAvg round of DP-SGD on this site's records."""
    run, site = _prepare(context)
    data = _site_data(run, site)
    server_round = _field(_config(msg), "server-round", int)
    q, steps = planned_steps(len(data.labels), run.batch_size, run.local_epochs)
    # Noise for the whole planned training, so that every round's spend is the same.
    z = _training_noise(site, run, q, steps * run.rounds)
    event = LedgerEvent(
        kind="dpsgd",
        noise_multiplier=z,
        sampling_rate=q,
        steps=steps,
        label=f"training round {server_round}",
        created_at=datetime.now(UTC),
    )
    store, ledger = _ledger(site)
    epsilon_after = ledger.record(event)  # raises BudgetExceededError before training
    store.append(event, epsilon_after)

    model = _model(run, data.features.shape[1], _arrays(msg))
    result = train_dp(
        model,
        data.features,
        data.labels,
        epochs=run.local_epochs,
        batch_size=run.batch_size,
        learning_rate=run.learning_rate,
        noise_multiplier=z,
        max_grad_norm=run.max_grad_norm,
    )
    logger.info(
        "%s round %d: %d steps, loss %.4f, ε %.3f of %.3f",
        site.name,
        server_round,
        result.steps,
        result.mean_loss,
        epsilon_after,
        site.epsilon,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord(
                {
                    "num-examples": result.records,
                    "train-loss": result.mean_loss,
                    "epsilon-total": epsilon_after,
                    "noise-multiplier": z,
                }
            ),
            "site": ConfigRecord({"site-name": site.name}),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query("explain")
def explain(msg: Message, context: Context) -> Message:
    """Contribute this site's clipped, noised, masked explanation to the aggregator."""
    run, site = _prepare(context)
    cfg = _config(msg)
    request = ExplainRequest(
        round_id=_field(cfg, "round-id", str),
        kind=_field(cfg, "kind", str),
        site_ids=tuple(json.loads(_field(cfg, "site-ids", str))),
        aggregator=_field(cfg, "aggregator", str),
        epsilon=_field(cfg, "epsilon", float),
        delta=_field(cfg, "delta", float),
        clip_bound=_field(cfg, "clip-bound", float),
        bits=_field(cfg, "bits", int),
        scale=_field(cfg, "scale", float),
        timeout_s=_field(cfg, "timeout", float),
        params=json.loads(_field(cfg, "params", str)),
    )
    data = _site_data(run, site)
    model = _model(run, data.features.shape[1], _arrays(msg))
    store, ledger = _ledger(site)
    outcome = contribute_explanation(
        request,
        site_id=site.name,
        model=model,
        features=data.features,
        labels=data.labels,
        ledger=ledger,
        store=store,
        rng=SecureRandom(),
        now=datetime.now(UTC),
    )
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"epsilon-total": outcome.cost.epsilon_total, "noise-std": outcome.noise_std}
            ),
            "status": ConfigRecord({"site-name": site.name, "phase": outcome.status.phase.value}),
        }
    )
    return Message(content=content, reply_to=msg)
