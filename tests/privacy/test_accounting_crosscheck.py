"""The ledger's ε for DP-SGD against Opacus's accountants, within their stated errors.

Three accountants bound the ε at δ of the Poisson-subsampled Gaussian mechanism composed
``T`` times, for add-or-remove-one neighbours:

* the ledger: ``dp_accounting``'s PLD accountant, pessimistic connect-the-dots
  discretisation (Doroshenko et al., PETS 2022) on a grid of interval Δ chosen by
  :func:`privacy.gaussian.pld_interval` (at most 1e-3, finer for steps with a small
  privacy loss). Its ε is an upper bound on the true ε; :mod:`privacy.gaussian` states it
  is tight to a few per cent.
* Opacus's ``PRVAccountant`` (Gopi, Lee, Wutschitz, NeurIPS 2021). With ``eps_error``
  ε_err and ``delta_error`` δ_err (Opacus's defaults: 0.01 and δ / 1000) it chooses the
  mesh and the truncated domain so that the discretised PRV's δ̂ satisfies
  ``δ(ε + ε_err) - δ_err <= δ̂(ε) <= δ(ε - ε_err) + δ_err`` (their Theorem 5.5 with
  Remark 5.6). ``DiscretePRV.compute_epsilon`` turns this into
  ``(lower, estimate, upper) = (ε̂(δ + δ_err) - ε_err, ε̂(δ), ε̂(δ - δ_err) + ε_err)`` with
  ``lower <= ε_true(δ) <= upper``. The public ``get_epsilon`` returns ``upper`` alone,
  so the tests reach the interval through ``_get_dprv`` and pin that ``get_epsilon`` is
  its upper end.
* Opacus's ``RDPAccountant`` (Mironov 2017; Mironov, Talwar, Zhang 2019), converted to
  (ε, δ) by Balle et al. 2020, Theorem 21, minimised over a finite set of orders (1.1 to
  63). An upper bound, never tighter than the optimal conversion.

Hence, writing ``E_pld`` for the ledger's discretisation error (ledger ε minus true ε,
never negative):

* ``prv.lower <= ε_true <= ledger`` — the lower side holds up to round-off only;
* ``ledger = ε_true + E_pld <= prv.upper + E_pld``;
* ``ledger <= rdp + E_pld`` — PLD accounting is exact up to discretisation, RDP is not.

``E_pld`` is bounded here by the documented claim, ``2 % of ε + Δ``: "a few per cent",
plus one discretisation interval, the rounding of a single event, which is what dominates
when ε is close to 0.

Why the grid adapts: when the per-step privacy loss, of order ``q / z`` nats, is not
large against Δ, connect-the-dots rounding inflates the composed privacy loss and the
ledger overstates ε; the overstatement depends on ``q / (z Δ)``. Measured against PLD at
Δ = 1e-5 and PRV, which agree with each other, a fixed Δ = 1e-3 overstated ε by about
100 % at 0.2, 50 % at 0.33, 15-20 % at 0.6, 8 % at 1, 2 % at 2 and under 1 % from 3 up
(for example ``z = 5, q = 0.001, T = 2000, δ = 1e-8``: 0.081 against PRV's
[0.030, 0.050]). The ledger now picks Δ so that ``q / (z Δ) >= 3``, down to Δ = 1e-4, so
the whole region checked here (``q / z >= 2e-4``) is resolved; the two cases that were
2x off are kept as regression tests.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy import PLD_VALUE_DISCRETIZATION, LedgerEvent, PrivacyLedger
from privacy.gaussian import pld_interval

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

PRV_EPS_ERROR = 0.01
"""Opacus's default ``eps_error``, the half-width ε_err of PRV's interval beyond δ_err."""

PLD_RELATIVE_ERROR = 0.02
"""The ledger's discretisation error, relative part: "a few per cent" (privacy.gaussian)."""

PLD_ABSOLUTE_ERROR = PLD_VALUE_DISCRETIZATION
"""The ledger's discretisation error, absolute part: one interval Δ (at most 1e-3)."""

ROUND_OFF = 1e-6
"""Floating-point round-off in the FFT convolutions of both libraries; far below ε_err."""

EPSILON_CAP = 10.0
"""Largest ledger ε sent to PRV. Beyond ε ≈ 10 a guarantee means little, and PRV's cost
grows with its safe domain (about the RDP ε at δ_err / 4) divided by its mesh (ε_err over
sqrt(T log(12 / δ_err) / 2)): 2 to 20 s per evaluation for z = 0.6, q >= 0.02,
T = 2000, against under 0.6 s below the cap. The RDP check, which is cheap, keeps the
whole region."""


@dataclass(frozen=True)
class Dpsgd:
    """One DP-SGD run: ``steps`` steps of noise multiplier ``z`` at sampling rate ``q``."""

    z: float
    q: float
    steps: int

    def event(self) -> LedgerEvent:
        return LedgerEvent(
            kind="dpsgd",
            noise_multiplier=self.z,
            sampling_rate=self.q,
            steps=self.steps,
            created_at=NOW,
        )


@dataclass(frozen=True)
class PrvInterval:
    lower: float
    estimate: float
    upper: float


@st.composite
def dpsgd_runs(draw: st.DrawFn) -> Dpsgd:
    """z in [0.6, 5], q log-uniform in [0.001, 0.2], 1 to 2000 steps."""
    z = draw(st.floats(min_value=0.6, max_value=5.0))
    log_q = draw(st.floats(min_value=math.log10(1e-3), max_value=math.log10(0.2)))
    steps = draw(st.integers(min_value=1, max_value=2000))
    return Dpsgd(z=z, q=10.0**log_q, steps=steps)


deltas = st.floats(min_value=-8.0, max_value=-4.0).map(lambda exponent: 10.0**exponent)


def ledger_epsilon(runs: list[Dpsgd], delta: float) -> float:
    """The ledger's ε at ``delta`` after recording ``runs`` (a budget that never binds)."""
    ledger = PrivacyLedger(1e9, delta)
    for run in runs[:-1]:
        ledger.record(run.event())
    return ledger.epsilon_with(runs[-1].event())


def opacus_history(accountant: RDPAccountant | PRVAccountant, runs: list[Dpsgd]) -> None:
    """Feed ``runs`` step by step, as Opacus's optimizer hook does."""
    for run in runs:
        for _ in range(run.steps):
            accountant.step(noise_multiplier=run.z, sample_rate=run.q)
    assert accountant.history == [(run.z, run.q, run.steps) for run in runs]


@contextmanager
def rdp_order_warnings_ignored() -> Iterator[None]:
    """Opacus warns when the best RDP order is the last of its grid (small ε, small δ).

    The RDP bound is then looser, still an upper bound; PRV also calls the RDP accountant
    to size its domain, where only an upper bound is needed.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        yield


def opacus_rdp_epsilon(runs: list[Dpsgd], delta: float) -> float:
    accountant = RDPAccountant()
    opacus_history(accountant, runs)
    with rdp_order_warnings_ignored():
        return float(accountant.get_epsilon(delta))


def opacus_prv_interval(runs: list[Dpsgd], delta: float) -> PrvInterval:
    """PRV's ``(lower, estimate, upper)`` with Opacus's default errors (see top)."""
    accountant = PRVAccountant()
    opacus_history(accountant, runs)
    delta_error = delta / 1000  # Opacus's default
    with rdp_order_warnings_ignored():
        dprv = accountant._get_dprv(eps_error=PRV_EPS_ERROR, delta_error=delta_error)
    lower, estimate, upper = dprv.compute_epsilon(delta, delta_error, PRV_EPS_ERROR)
    return PrvInterval(float(lower), float(estimate), float(upper))


def pld_error_allowance(epsilon: float) -> float:
    return PLD_RELATIVE_ERROR * epsilon + PLD_ABSOLUTE_ERROR


def assert_agrees_with_prv(ledger: float, prv: PrvInterval) -> None:
    assert ledger >= prv.lower - ROUND_OFF, (ledger, prv)
    assert ledger <= prv.upper + pld_error_allowance(ledger), (ledger, prv)


@settings(max_examples=25, deadline=None)
@given(run=dpsgd_runs(), delta=deltas)
def test_ledger_is_at_most_opacus_rdp(run: Dpsgd, delta: float) -> None:
    ledger = ledger_epsilon([run], delta)
    assert ledger <= opacus_rdp_epsilon([run], delta) + pld_error_allowance(ledger)


@settings(max_examples=20, deadline=None)
@given(run=dpsgd_runs(), delta=deltas)
def test_ledger_agrees_with_opacus_prv(run: Dpsgd, delta: float) -> None:
    ledger = ledger_epsilon([run], delta)
    assume(ledger <= EPSILON_CAP)
    assert_agrees_with_prv(ledger, opacus_prv_interval([run], delta))


@settings(max_examples=12, deadline=None)
@given(
    first=dpsgd_runs(),
    second=dpsgd_runs(),
    delta=deltas,
)
def test_composition_of_two_runs_agrees_with_opacus(
    first: Dpsgd, second: Dpsgd, delta: float
) -> None:
    assume((first.z, first.q) != (second.z, second.q))  # else Opacus merges the entries
    runs = [first, second]
    ledger = ledger_epsilon(runs, delta)
    assume(ledger <= EPSILON_CAP)
    assert ledger <= opacus_rdp_epsilon(runs, delta) + pld_error_allowance(ledger)
    assert_agrees_with_prv(ledger, opacus_prv_interval(runs, delta))


def test_opacus_prv_get_epsilon_is_the_upper_end_of_its_interval() -> None:
    # The cross-checks read PRV's interval through a private method; this pins that the
    # public answer is its upper end, as Opacus documents ("return upper bound").
    run, delta = Dpsgd(z=1.0, q=0.02, steps=200), 1e-5
    accountant = PRVAccountant()
    opacus_history(accountant, [run])
    interval = opacus_prv_interval([run], delta)
    assert interval.lower < interval.estimate < interval.upper
    with rdp_order_warnings_ignored():
        public = accountant.get_epsilon(delta)
    assert public == pytest.approx(interval.upper, rel=1e-12)


ONCE_UNRESOLVED = [
    pytest.param(Dpsgd(z=5.0, q=0.001, steps=2000), 1e-8, id="z5-q0.001-T2000"),
    pytest.param(Dpsgd(z=3.0, q=0.001, steps=2000), 1e-8, id="z3-q0.001-T2000"),
]


@pytest.mark.parametrize(("run", "delta"), ONCE_UNRESOLVED)
def test_steps_with_a_small_privacy_loss_get_a_finer_grid_and_a_tight_epsilon(
    run: Dpsgd, delta: float
) -> None:
    assert pld_interval(run.z, run.q) < PLD_VALUE_DISCRETIZATION
    ledger = ledger_epsilon([run], delta)
    prv = opacus_prv_interval([run], delta)
    assert prv.lower - ROUND_OFF <= ledger <= prv.upper + pld_error_allowance(ledger)
    assert ledger <= opacus_rdp_epsilon([run], delta)
