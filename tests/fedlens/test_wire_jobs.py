"""Job messages round-trip through fedlens.wire unchanged."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlens import wire
from fedlens.errors import IntegrityError
from fedlens.jobs import Job, JobRequest, JobState
from fedlens.v1 import query_pb2

text = st.text(max_size=16)

requests = st.builds(
    JobRequest,
    kind=text,
    params=st.dictionaries(text, text, max_size=4),
    cohort=text,
    query_input=text,
)
jobs = st.builds(
    Job,
    job_id=text,
    kind=text,
    state=st.sampled_from(list(JobState)),
    reason=text,
    release_id=text,
    submitted_by=text,
    created_at=text,
    updated_at=text,
    from_cache=st.booleans(),
)


@given(requests)
def test_job_request_round_trips(request: JobRequest) -> None:
    assert wire.job_request_from_proto(wire.job_request_to_proto(request)) == request


@given(jobs)
def test_job_round_trips(job: Job) -> None:
    assert wire.job_from_proto(wire.job_to_proto(job)) == job


def test_unknown_job_state_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError, match="unknown job state 'paused'"):
        wire.job_from_proto(query_pb2.Job(job_id="j", state="paused"))
