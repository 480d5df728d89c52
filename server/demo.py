"""``fedlens demo``: the whole path on embedded data, with the real Flower runtime.

An aggregator (the fedlens gRPC services) starts on a free loopback port; a local Flower
deployment (one SuperLink, one SuperNode per site) trains with DP-SGD for a few FedAvg
rounds and runs one ``global_attribution`` explanation round through secure
aggregation; the release is read back through the ``Query`` service.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from fedlens.datasets import available_datasets, load_dataset
from fedlens.errors import ConfigurationError, FedlensError
from fedlens.query_client import QueryClient
from fedlens.runconfig import RunConfig
from fedlens.types import Release
from privacy.planning import PlanRequest, plan_budget
from server.aggregation import Aggregator, QueryHandler
from server.deployment import LocalFederation, SiteSpec
from server.grpc_server import serve
from server.identities import IdentityRegistry
from server.storage import Store

__all__ = ["DemoOptions", "DemoReport", "run_demo"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Share of each site's ε budget given to DP-SGD; the explanation release gets the rest.
TRAINING_SHARE = 0.7
SITE_DELTA = 1e-5


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "adult"
    sites: int = 4
    rounds: int = 3
    epsilon: float = 4.0
    model: Literal["logistic", "mlp"] = "logistic"
    workdir: str = "fedlens-demo"
    seed: int = 0

    def validate(self) -> None:
        if self.dataset not in available_datasets():
            raise ConfigurationError(
                f"unknown dataset {self.dataset!r}; available: {', '.join(available_datasets())}"
            )
        if not 2 <= self.sites <= 16:
            raise ConfigurationError(f"--sites must be in [2, 16], got {self.sites}")
        if not 1 <= self.rounds <= 100:
            raise ConfigurationError(f"--rounds must be in [1, 100], got {self.rounds}")
        if not 0 < self.epsilon <= 100:
            raise ConfigurationError(f"--epsilon must be in (0, 100], got {self.epsilon}")


@dataclass(frozen=True)
class DemoReport:
    release: Release
    accuracy: float
    epsilon_total: dict[str, float]
    database_url: str
    run_dir: Path
    seconds: float


def split_budget(options: DemoOptions) -> tuple[float, float]:
    """``(train_epsilon, explain_epsilon)`` that use every site's budget, planned up front.

    Training gets :data:`TRAINING_SHARE` of ε; the release gets what is left once the two
    are composed (:func:`privacy.planning.plan_budget`), for the site that can afford the
    least, rounded down so that every site's own check of the run passes.

    Raises
    ------
    ConfigurationError
        The budget cannot pay for the run at some site (the message names the setting).
    """
    run = RunConfig()
    dataset = load_dataset(options.dataset, seed=options.seed)
    release_epsilons = []
    for i in range(options.sites):
        records = len(
            dataset.site(
                i, options.sites, partition=run.partition, alpha=run.alpha, seed=options.seed
            ).labels
        )
        request = PlanRequest(
            budget_epsilon=options.epsilon,
            delta=SITE_DELTA,
            records=records,
            batch_size=run.batch_size,
            rounds=options.rounds,
            local_epochs=run.local_epochs,
            releases=run.releases,
            training_share=TRAINING_SHARE,
        )
        release_epsilons.append(plan_budget(request).release_epsilon)
    explain_epsilon = math.floor(min(release_epsilons) * 999) / 1000
    return TRAINING_SHARE * options.epsilon, explain_epsilon


def run_demo(options: DemoOptions, *, console: Console | None = None) -> DemoReport:
    """Run the demo federation and return what it released.

    Raises
    ------
    FedlensError
        The run failed; the message says where the logs are.
    """
    options.validate()
    console = console or Console(stderr=True)
    started = time.monotonic()
    workdir = Path(options.workdir).resolve()
    run_dir = workdir / "runs" / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    database_url = f"sqlite:///{workdir / 'fedlens.db'}"
    store = Store(database_url)
    # Each site's identity key is enrolled at its first round (first-use enrolment).
    aggregator = Aggregator(store, identities=IdentityRegistry(store), enrolment="first-use")
    server = serve(aggregator, QueryHandler(store))
    train_epsilon, explain_epsilon = split_budget(options)
    sites = [
        SiteSpec(
            name=f"site-{i}",
            node_config={
                "partition-id": i,
                "num-partitions": options.sites,
                "site-name": f"site-{i}",
                "state-dir": str(run_dir / "sites" / f"site-{i}"),
                "epsilon": options.epsilon,
                "delta": SITE_DELTA,
                # All sites share this machine's cores: one torch thread each.
                "threads": 1,
            },
        )
        for i in range(options.sites)
    ]
    run = RunConfig(
        dataset=options.dataset,
        model=options.model,
        num_sites=options.sites,
        rounds=options.rounds,
        seed=options.seed,
        train_epsilon=train_epsilon,
        explain_epsilon=explain_epsilon,
        explain_delta=SITE_DELTA,
        aggregator=server.address,
        out_dir=str(run_dir / "out"),
    )
    try:
        with (
            console.status("starting the federation") as status,
            LocalFederation(run_dir, sites) as federation,
        ):
            console.log(
                f"{options.sites} sites on {options.dataset}, ε = {options.epsilon} each; "
                f"aggregator on {server.address}; logs in {federation.logs}"
            )

            def progress(line: str) -> None:
                text = _ANSI.sub("", line).strip()
                if "[ROUND" in text:
                    status.update(f"training {text.split('[', 1)[1].rstrip(']').lower()}")
                    console.log(f"training {text.split('[', 1)[1].rstrip(']').lower()}")
                elif "Global Arrays" in text:
                    status.update("explanation round: attributions, noise, masked aggregation")
                    console.log("training done; explanation round")

            status.update("waiting for the sites to connect")
            outcome = federation.run(run.to_flower(), on_line=progress)
        summary_path = run_dir / "out" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        if not outcome.completed or not summary.get("release_id"):
            reason = summary.get("reason") or summary.get("refusals") or outcome.details
            raise FedlensError(
                f"the federation ended {outcome.status} ({reason}); logs in {run_dir / 'logs'}"
            )
        with QueryClient(server.address) as client:
            release = client.get_release(summary["release_id"])
    finally:
        server.stop()
        store.close()
    return DemoReport(
        release=release,
        accuracy=float(summary["accuracy"]),
        epsilon_total={k: float(v) for k, v in summary["epsilon_total"].items()},
        database_url=database_url,
        run_dir=run_dir,
        seconds=time.monotonic() - started,
    )
