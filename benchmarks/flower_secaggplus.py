"""Flower's own SecAgg+ on N sites, in Flower's deployment runtime.

    python -m benchmarks.flower_secaggplus --sites N --dim D --dropout F --json OUT

A SuperLink and N SuperNodes run as local processes (``server.deployment``; runtime
dependency installation off), and ``flwr run`` submits the app project in
``benchmarks/flower_secaggplus_app``: one round of Flower's ``SecAggPlusWorkflow`` on the
server with ``secaggplus_mod`` on every client, each site contributing a fixed float32
vector of shape ``(D,)``. ``round(F * N)`` sites drop out after sharing their keys (they
fail in the masked-vector stage), so the server has to reconstruct their pairwise masks.

The round's seconds are measured inside the ServerApp, from the first SecAgg+ message to
the unmasked result, after every SuperNode has registered; the start-up (processes, node
registration, ServerApp launch) is reported apart. The sum is checked here: the
workflow's weighted mean times the number of survivors must equal the plain float64 sum
of the survivors' vectors within Flower's quantisation error (stochastic rounding to
steps of ``2 * clipping_range / quantization_range``, under one step per site and entry).

The figure is Flower's runtime as shipped, so it includes the runtime's own latencies,
which set a floor of several seconds per stage whatever N and D: every ClientApp call is
a fresh ``flwr-clientapp`` process (four per site per round), an idle SuperNode pulls the
SuperLink every 3 s, its SuperExec looks for tasks every second, and the ServerApp's grid
pulls replies every 3 s.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any

import flwr
import numpy as np

from benchmarks.flower_secaggplus_app.fedlens_secaggplus.vectors import site_vector
from fedlens.errors import ConfigurationError, FedlensError
from server.deployment import CONNECTION, LocalFederation, SiteSpec, toml_value

__all__ = ["default_shares", "run_flower_secaggplus"]

logger = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parent / "flower_secaggplus_app"
# SecAggPlusWorkflow's defaults, which the app keeps.
CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
# Each site's quantised entries and its weight are summed modulo 2**32, each under 2**22.
MAX_SITES = MODULUS_RANGE // QUANTIZATION_RANGE - 1


class _SecAggPlusFederation(LocalFederation):
    """A local deployment that submits the SecAgg+ benchmark app instead of fedlens's."""

    def _write_app(self) -> None:
        shutil.copytree(
            APP_DIR,
            self.app_dir,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns("__pycache__"),
        )

    def submit(self, run_config: Mapping[str, object]) -> int:
        """Submit the app with ``run_config`` and return the run id, without streaming.

        Streaming the run's log keeps a connection open to the SuperLink for the whole run;
        on a loaded machine that stream drops, so completion is watched by polling instead.
        """
        pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        out = self.flwr("run", str(self.app_dir), CONNECTION, "--format", "json", "-c", pairs)
        try:
            info = json.loads(out)
        except json.JSONDecodeError:
            info = {}
        if not info.get("success"):
            raise FedlensError(f"the Flower run was not accepted: {out.strip()!r}")
        return int(info["run-id"])

    def status(self, run_id: int) -> tuple[str, str] | None:
        """The run's status and details, or ``None`` if the SuperLink did not answer."""
        try:
            out = self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
            run = json.loads(out)["runs"][0]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError, IndexError):
            return None
        return str(run["status"]), str(run.get("status-details"))

    def wait_for(self, run_id: int, result: Path, timeout_s: float) -> None:
        """Wait until the ServerApp has written ``result``; raise if the run ends without."""
        deadline = time.monotonic() + timeout_s
        next_check = time.monotonic() + 5.0
        while not result.exists():
            now = time.monotonic()
            if now >= deadline:
                with suppress(subprocess.TimeoutExpired):
                    self.flwr("stop", str(run_id), CONNECTION)
                raise FedlensError(
                    f"Flower run {run_id} did not finish within {timeout_s:.0f}s; "
                    f"logs in {self.logs}"
                )
            if now >= next_check:
                status = self.status(run_id)
                if status is not None and status[0].startswith("finished"):
                    if result.exists():
                        return
                    raise FedlensError(
                        f"Flower run {run_id} ended {status[0]}: {status[1]}; logs in {self.logs}"
                    )
                next_check = time.monotonic() + 10.0
            time.sleep(0.5)

    def rss_mb(self) -> float:
        """Resident memory of the SuperLink and SuperNodes (MiB; Linux ``/proc``)."""
        total_kb = 0
        for proc in self._procs.values():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        return total_kb / 1024


def default_shares(sites: int) -> tuple[int, int]:
    """SecAgg+ neighbourhood size and reconstruction threshold for ``sites`` sites.

    The neighbourhood is odd and logarithmic in the number of sites, as SecAgg+
    (Bell et al., CCS 2020) prescribes, capped at all sites; the threshold is a strict
    majority of it.
    """
    shares = min(sites, 2 * math.ceil(math.log2(sites)) + 1)
    return shares, shares // 2 + 1


def _check(sites: int, dim: int, dropout: float) -> None:
    if not 3 <= sites <= MAX_SITES:
        raise ConfigurationError(f"sites must be in [3, {MAX_SITES}], got {sites}")
    if dim < 1:
        raise ConfigurationError(f"dim must be at least 1, got {dim}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigurationError(f"dropout must be in [0, 1), got {dropout}")


def run_flower_secaggplus(
    sites: int,
    dim: int,
    dropout: float,
    *,
    timeout_s: float = 900,
    num_shares: int | None = None,
    threshold: int | None = None,
    seed: int = 0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run one round of Flower's SecAgg+ over ``sites`` SuperNodes and time it.

    Parameters
    ----------
    sites
        Number of SuperNodes, each one site (3 to 1023).
    dim
        Length of every site's float32 vector, shape ``(dim,)``.
    dropout
        Fraction of sites that drop out after sharing their keys; ``round(dropout *
        sites)`` of them.
    timeout_s
        Limit for the whole Flower run.
    num_shares, threshold
        SecAgg+ neighbourhood size and reconstruction threshold; ``default_shares``
        when not given.
    seed
        Seed of the sites' vectors.
    workdir
        Where Flower's state and logs go; a temporary directory (removed) if not given.

    Returns
    -------
    dict
        ``flower_secaggplus_s`` (the round, seconds), ``flower_startup_s``,
        ``checked_sum``, ``max_abs_error`` and ``error_bound``, the stage seconds, the
        counts and the machine (cores, platform).
    """
    _check(sites, dim, dropout)
    shares, thresh = default_shares(sites)
    shares = num_shares if num_shares is not None else shares
    thresh = threshold if threshold is not None else thresh
    dropped = frozenset(range(round(dropout * sites)))
    specs = [SiteSpec(f"site-{i}", {"site-index": i, "drop": i in dropped}) for i in range(sites)]
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flwr-sa+")))
        out_dir = workdir / "out"
        load_before = os.getloadavg()[0]
        launched = time.time()
        federation = _SecAggPlusFederation(workdir, specs)
        stack.enter_context(federation)
        superlink_up = time.time()
        run_config = {
            "num-sites": sites,
            "dim": dim,
            "seed": seed,
            "num-shares": shares,
            "reconstruction-threshold": thresh,
            "node-wait": min(timeout_s, 600.0),
            "out-dir": str(out_dir),
        }
        submitted = time.time()
        run_id = federation.submit(run_config)
        federation.wait_for(run_id, out_dir / "result.json", timeout_s)
        finished = time.time()
        rss_mb = federation.rss_mb()
        report = json.loads((out_dir / "result.json").read_text())
        aggregate = np.load(out_dir / "aggregate.npy")

    survivors = [i for i in range(sites) if i not in dropped]
    plain = np.sum([site_vector(seed, i, dim).astype(np.float64) for i in survivors], axis=0)
    secure = np.asarray(aggregate, dtype=np.float64) * len(survivors)
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    # Under one step per site and entry, plus float64 rounding of the rescaling.
    bound = len(survivors) * step + 1e-9 * max(1.0, float(np.max(np.abs(plain))))
    max_err = float(np.max(np.abs(secure - plain))) if secure.shape == plain.shape else math.inf
    checked = bool(report["completed"]) and report.get("survivors") == len(survivors)
    checked = checked and max_err <= bound
    return {
        "flower_sites": sites,
        "flower_dim": dim,
        "flower_dropout": dropout,
        "flower_dropped": len(dropped),
        "flower_survivors": report.get("survivors"),
        "flower_secaggplus_s": report["round_s"],
        "flower_stage_s": report["stage_s"],
        "flower_workflow_s": report["workflow_s"],
        "flower_startup_s": report["nodes_ready"] - launched,
        "flower_superlink_start_s": superlink_up - launched,
        "flower_serverapp_start_s": report["serverapp_entered"] - submitted,
        "flower_run_total_s": finished - submitted,
        "flower_runtime": "deployment",
        "flower_version": flwr.__version__,
        "flower_num_shares": report.get("num_shares", shares),
        "flower_threshold": report.get("threshold", thresh),
        "flower_rss_mb": round(rss_mb, 1),
        "checked_sum": checked,
        "max_abs_error": max_err,
        "error_bound": bound,
        "cores": os.cpu_count(),
        # The machine may be shared: its 1-minute load before and after the run.
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg()[0],
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--dim", type=int, default=10_000)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--num-shares", type=int, default=None)
    parser.add_argument("--threshold", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep Flower's logs here")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_flower_secaggplus(
        args.sites,
        args.dim,
        args.dropout,
        timeout_s=args.timeout,
        num_shares=args.num_shares,
        threshold=args.threshold,
        workdir=args.workdir,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("%s", json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
