"""The run configuration a coordinator hands every site, validated at the Flower boundary.

Flower passes it as ``context.run_config`` (keys with dashes, as declared in the Flower
app's ``pyproject.toml``); :meth:`RunConfig.from_flower` checks it once, with errors that
name the key and the accepted range.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedlens.errors import ConfigurationError

__all__ = ["INFLUENCE_KINDS", "RunConfig", "validation_message"]

# Kinds that score training records with influence, and so need second-order factors
# (or TracIn checkpoints) besides the model.
INFLUENCE_KINDS = frozenset(
    {
        "group_influence",
        "influence_prototypes",
        "self_influence",
        "site_contribution",
        "loo_unfairness",
    }
)


class RunConfig(BaseModel):
    """What the federation trains and explains in one run."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    dataset: str = "adult"
    model: Literal["logistic", "mlp"] = "logistic"
    num_sites: int = Field(4, ge=2, le=64, alias="num-sites")
    rounds: int = Field(3, ge=1, le=1000, alias="num-server-rounds")
    local_epochs: int = Field(2, ge=1, le=100, alias="local-epochs")
    batch_size: int = Field(256, ge=1, alias="batch-size")
    learning_rate: float = Field(2.0, gt=0, le=100, alias="learning-rate")
    partition: Literal["dirichlet", "natural"] = "dirichlet"
    alpha: float = Field(1.0, gt=0)
    seed: int = 0
    train_epsilon: float = Field(2.8, gt=0, alias="train-epsilon")
    max_grad_norm: float = Field(1.0, gt=0, alias="max-grad-norm")
    explain_kind: str = Field("global_attribution", alias="explain-kind")
    # global_attribution only: Captum method, "logit" or "both" classes, and a cohort
    # filter as JSON ({"sex": ["Female"], "age": [30, 50]}; "" for every record).
    explain_method: Literal["integrated_gradients", "gradient_shap", "feature_ablation"] = Field(
        "integrated_gradients", alias="explain-method"
    )
    explain_target: Literal["logit", "both"] = Field("logit", alias="explain-target")
    explain_cohort: str = Field("", alias="explain-cohort")
    min_cohort_size: int = Field(50, ge=1, alias="min-cohort-size")
    explain_epsilon: float = Field(1.0, gt=0, alias="explain-epsilon")
    explain_delta: float = Field(1e-6, gt=0, lt=1e-2, alias="explain-delta")
    attribution_clip: float = Field(0.5, gt=0, alias="attribution-clip")
    ig_steps: int = Field(32, ge=2, le=1024, alias="ig-steps")
    # Secure aggregation: least number of sites in a released sum (0: floor(2n/3) + 1)
    # and the SecAgg+ neighbour degree (0: every pair of sites masks).
    secagg_threshold: int = Field(0, ge=0, alias="secagg-threshold")
    secagg_degree: int = Field(0, ge=0, alias="secagg-degree")
    # Noise placement: "local" (every site adds the full Gaussian noise) or
    # "distributed" (each adds a discrete Gaussian share so the sum carries the noise
    # after dropouts down to the threshold and `secagg-colluding` sites colluding).
    secagg_noise: Literal["local", "distributed"] = Field("local", alias="secagg-noise")
    secagg_colluding: int = Field(0, ge=0, alias="secagg-colluding")
    # Influence kinds (group_influence, influence_prototypes, self_influence,
    # site_contribution, loo_unfairness): "auto" takes the exact Hessian for logistic
    # models and K-FAC for MLPs, released in a round of their own first ("ekfac" adds a
    # round of eigenvalue corrections after the K-FAC one); "tracin" uses the global
    # models of the training rounds instead. The query is a raw record as JSON
    # ("" for the first record of the public test split).
    influence_method: Literal["auto", "hessian", "kfac", "ekfac", "tracin"] = Field(
        "auto", alias="influence-method"
    )
    influence_query: str = Field("", alias="influence-query")
    influence_group_by: str = Field("label", alias="influence-group-by")
    influence_k: int = Field(10, ge=1, le=10_000, alias="influence-k")
    influence_clip: float = Field(10.0, gt=0, alias="influence-clip")
    influence_damping: float = Field(0.01, gt=0, alias="influence-damping")
    second_order_clip: float = Field(2.0, gt=0, alias="second-order-clip")
    aggregator: str = "127.0.0.1:50151"
    phase_timeout_s: float = Field(90.0, gt=0, alias="phase-timeout")
    out_dir: str = Field("", alias="out-dir")
    # An analyst's job (server.jobs): the ServerApp skips training, explains the stored
    # model `job-model-id` and reports the outcome to the coordinator.
    job_id: str = Field("", alias="job-id")
    job_model_id: str = Field("", alias="job-model-id")

    @property
    def second_order_method(self) -> str:
        """``hessian``, ``kfac``, ``ekfac`` or ``""`` (no second-order release: TracIn or no
        influence kind)."""
        if self.explain_kind not in INFLUENCE_KINDS or self.influence_method == "tracin":
            return ""
        if self.influence_method == "auto":
            return "hessian" if self.model == "logistic" else "kfac"
        return self.influence_method

    @property
    def releases(self) -> int:
        """Explanation releases per run: the ServerApp runs one explanation round, after
        the second-order rounds the kind needs (one, or two for EK-FAC)."""
        return {"": 1, "ekfac": 3}.get(self.second_order_method, 2)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, object]) -> RunConfig:
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as exc:
            raise ConfigurationError(validation_message("run config", exc)) from None

    def to_flower(self) -> dict[str, str | int | float]:
        """The ``--run-config`` pairs Flower accepts (keys as the Flower app declares them)."""
        return dict(self.model_dump(by_alias=True))


def validation_message(what: str, exc: ValidationError) -> str:
    """One line per invalid field: ``what.key: problem (got value)``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        lines.append(f"{what} {key}: {err['msg']} (got {err.get('input')!r})")
    return "; ".join(lines)
