"""Analysts' explanation jobs as domain types: what was asked and what became of it.

A job is one question (an explanation kind with its parameters, an optional cohort and
query input) that the coordinator answers with a release. Only :mod:`fedlens.wire`
converts these to and from protobuf messages; the queue itself is :mod:`server.jobs`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedlens.errors import ConfigurationError

__all__ = ["Job", "JobRequest", "JobState"]


class JobState(enum.StrEnum):
    """Where a job stands: ``queued`` → ``running`` → ``done``, ``refused`` or ``failed``.

    ``refused`` means nothing was spent (the request was invalid or unaffordable, or a
    site refused before advertising keys); ``failed`` means the run broke off.
    """

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    REFUSED = "refused"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.REFUSED, JobState.FAILED)

    @classmethod
    def parse(cls, value: str) -> JobState:
        try:
            return cls(value)
        except ValueError:
            raise ConfigurationError(
                f"unknown job state {value!r}; expected one of {', '.join(s.value for s in cls)}"
            ) from None


@dataclass(frozen=True)
class JobRequest:
    """An analyst's question, as submitted.

    Attributes
    ----------
    kind
        A registered explanation kind.
    params
        Run-configuration keys of the explanation (``explain-epsilon``, ...), as text.
    cohort
        ``global_attribution`` only: a JSON object filtering records; ``""`` for all.
    query_input
        Influence kinds only: a JSON object of raw feature values; ``""`` for the
        default query.
    """

    kind: str
    params: Mapping[str, str] = field(default_factory=dict)
    cohort: str = ""
    query_input: str = ""


@dataclass(frozen=True)
class Job:
    """A submitted job and its outcome (times in RFC 3339)."""

    job_id: str
    kind: str
    state: JobState
    reason: str = ""
    release_id: str = ""
    submitted_by: str = ""
    created_at: str = ""
    updated_at: str = ""
    from_cache: bool = False
