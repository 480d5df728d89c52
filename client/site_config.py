"""A site's own configuration: who it is, where its state lives, and its privacy budget.

Set by the site operator on the SuperNode (``--node-config "partition-id=0 ..."``), never
by the coordinator: the budget is the site's to decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fedlens.errors import ConfigurationError
from fedlens.runconfig import validation_message

__all__ = ["SiteConfig"]


class SiteConfig(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    partition_id: int = Field(ge=0, alias="partition-id")
    num_partitions: int = Field(ge=1, alias="num-partitions")
    site_name: str = Field("", alias="site-name")
    state_dir: Path = Field(Path("fedlens-site"), alias="state-dir")
    epsilon: float = Field(4.0, gt=0, le=100, description="the site's total ε budget")
    delta: float = Field(1e-5, gt=0, lt=1e-2, description="the site's δ")
    threads: int = Field(
        0, ge=0, le=256, description="torch threads for this site's work; 0 keeps torch's default"
    )
    site_breakdown: bool = Field(
        False,
        alias="site-breakdown",
        description="allow releases broken down by site (own coordinate, local noise only)",
    )
    aggregator_ca: Path | None = Field(
        None,
        alias="aggregator-ca",
        description="CA certificate (PEM) of the aggregator's TLS certificate; plaintext if unset",
    )

    @field_validator("aggregator_ca", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> SiteConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id {self.partition_id} must be below "
                f"num-partitions {self.num_partitions}"
            )
        return self

    @property
    def name(self) -> str:
        return self.site_name or f"site-{self.partition_id}"

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite"

    @classmethod
    def from_flower(cls, node_config: Mapping[str, object]) -> SiteConfig:
        try:
            return cls.model_validate(dict(node_config))
        except ValidationError as exc:
            raise ConfigurationError(validation_message("node config", exc)) from None
