"""Runs analysts' queued jobs, one at a time, through the Flower ServerApp.

The runner claims the oldest queued job (:meth:`server.jobs.JobQueue.claim_next`), and
launches a Flower run whose run configuration is the job's (``job-id``, ``job-model-id``,
the explanation kind and its parameters) with the deployment's keys over it (where the
ServerApp reaches the coordinator, phase timeouts). The ServerApp skips training,
explains the stored model and reports the outcome with ``FinishJob``
(:mod:`server.job_app`). A run that ends without reporting — the ServerApp crashed, the
run was stopped, ``flwr`` could not submit it — leaves the job ``failed`` with what the
launcher said.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedlens.errors import ConfigurationError
from fedlens.jobs import Job, JobState
from server.deployment import toml_value
from server.jobs import JobQueue

__all__ = ["DEPLOYMENT_KEYS", "FlowerLauncher", "JobRunner", "Launch"]

logger = logging.getLogger(__name__)

# Run-configuration keys that belong to the deployment, not to the job.
DEPLOYMENT_KEYS = frozenset({"aggregator", "phase-timeout", "out-dir"})

# Submits one Flower run with the given run configuration, waits for it to end, and
# says how it ended (for a job the ServerApp never reported).
Launch = Callable[[dict[str, Any]], str]


class FlowerLauncher:
    """``flwr run APP CONNECTION --run-config ...``: a run on an existing SuperLink.

    Parameters
    ----------
    app_dir
        The fedlens Flower app (a directory holding its ``pyproject.toml``).
    connection
        A SuperLink connection named in ``$FLWR_HOME/config.toml``.
    timeout_s
        Longest a run may take before it is given up.
    env
        The environment of ``flwr`` (this process's by default).
    """

    def __init__(
        self,
        app_dir: Path,
        connection: str,
        *,
        timeout_s: float = 3600.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not (app_dir / "pyproject.toml").is_file():
            raise ConfigurationError(f"{app_dir} holds no Flower app (pyproject.toml)")
        self.app_dir, self.connection, self.timeout_s = app_dir, connection, timeout_s
        self.env = dict(env) if env is not None else None
        beside = Path(sys.executable).parent / "flwr"
        self.flwr = str(beside) if beside.exists() else "flwr"

    def __call__(self, run_config: dict[str, Any]) -> str:
        pairs = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        cmd = [self.flwr, "run", str(self.app_dir), self.connection, "--stream"]
        try:
            done = subprocess.run(
                [*cmd, "--run-config", pairs],
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
                env=self.env,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"flwr run did not complete: {exc}"
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        return f"flwr run exited with {done.returncode}: {tail}"


class JobRunner:
    """Takes queued jobs one at a time and runs each through ``launch``.

    Parameters
    ----------
    queue
        The coordinator's job queue.
    launch
        Runs the Flower app with a run configuration and waits for it
        (:class:`FlowerLauncher`, or :meth:`server.deployment.LocalFederation.run`).
    deployment
        Run-configuration keys of the deployment (:data:`DEPLOYMENT_KEYS`), put over
        every job's: at least ``aggregator``, the coordinator's address as the
        ServerApp reaches it.
    poll_s
        Seconds between looks at an empty queue.
    """

    def __init__(
        self,
        queue: JobQueue,
        launch: Launch,
        *,
        deployment: Mapping[str, Any],
        poll_s: float = 2.0,
    ) -> None:
        unknown = sorted(set(deployment) - DEPLOYMENT_KEYS)
        if unknown:
            raise ConfigurationError(
                f"deployment keys {unknown} are not the deployment's; "
                f"accepted: {', '.join(sorted(DEPLOYMENT_KEYS))}"
            )
        self._queue, self._launch = queue, launch
        self._deployment = dict(deployment)
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_next(self) -> Job | None:
        """Run the oldest queued job to its end; ``None`` if nothing is queued."""
        claimed = self._queue.claim_next()
        if claimed is None:
            return None
        job, config = claimed
        logger.info("running job %s (%s)", job.job_id, job.kind)
        try:
            said = self._launch(config | self._deployment)
        except Exception as exc:  # the job must not stay running whatever the launcher did
            logger.exception("job %s: the launcher failed", job.job_id)
            said = f"{type(exc).__name__}: {exc}"
        final = self._queue.get(job.job_id)
        if final.state is JobState.RUNNING:
            final = self._queue.finish(
                job.job_id, reason=f"the Flower run ended without reporting the job ({said})"
            )
        logger.info("job %s %s %s", job.job_id, final.state.value, final.release_id)
        return final

    def start(self) -> None:
        """Run jobs in a background thread until :meth:`stop`."""
        if self._thread is not None:
            raise ConfigurationError("the job runner is already started")
        self._thread = threading.Thread(target=self._loop, name="fedlens-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the job in progress, if any, has ended."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_next()
            except Exception:  # keep serving the queue; the store may be back next time
                logger.exception("the job runner failed to take a job")
                ran = None
            if ran is None:
                self._stop.wait(self._poll_s)
