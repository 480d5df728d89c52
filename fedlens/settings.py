"""Settings, validated once at the boundary (environment prefix ``FEDLENS_``).

Nested models use ``__`` in environment names, e.g. ``FEDLENS_PRIVACY__EPSILON=2``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["FederationSettings", "PrivacySettings", "Settings"]


class PrivacySettings(BaseModel):
    """A site's budget and how it is split."""

    epsilon: float = Field(4.0, gt=0, le=100, description="site budget ε for everything")
    delta: float = Field(1e-5, gt=0, lt=1e-2, description="site budget δ; keep it below 1/records")
    training_share: float = Field(
        0.7, gt=0, lt=1, description="fraction of ε given to DP-SGD; the rest to releases"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="DP-SGD per-record gradient clip bound")
    attribution_clip: float = Field(
        0.5, gt=0, description="per-record L2 bound on an attribution vector"
    )
    noise: Literal["local"] = Field(
        "local", description="noise placement; 'distributed' arrives with secure aggregation v2"
    )


class FederationSettings(BaseModel):
    """What the federation trains and explains."""

    dataset: str = "adult"
    model: Literal["logistic", "mlp"] = "logistic"
    sites: int = Field(4, ge=2, le=64)
    rounds: int = Field(3, ge=1, le=1000)
    local_epochs: int = Field(1, ge=1, le=100)
    batch_size: int = Field(256, ge=1)
    learning_rate: float = Field(0.5, gt=0)
    partition: Literal["dirichlet", "natural"] = "dirichlet"
    alpha: float = Field(1.0, gt=0, description="Dirichlet label-skew concentration")
    seed: int = 0
    phase_timeout_s: float = Field(120.0, gt=0)


class Settings(BaseSettings):
    """Top-level settings of a coordinator or a site."""

    model_config = SettingsConfigDict(env_prefix="FEDLENS_", env_nested_delimiter="__")

    database_url: str = "sqlite:///fedlens.db"
    aggregator_address: str = "127.0.0.1:50151"
    privacy: PrivacySettings = PrivacySettings()
    federation: FederationSettings = FederationSettings()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if ":" not in self.aggregator_address:
            raise ValueError(
                f"aggregator_address must be host:port, got {self.aggregator_address!r}"
            )
        return self
