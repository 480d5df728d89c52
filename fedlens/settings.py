"""Process settings, validated once at the boundary (environment prefix ``FEDLENS_``).

What a run trains and explains is the run configuration (:mod:`fedlens.runconfig`); what a
site allows is its node configuration (:mod:`client.site_config`). These settings say
where a coordinator keeps its store and where clients find it.
"""

from __future__ import annotations

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """``FEDLENS_DATABASE_URL`` and ``FEDLENS_AGGREGATOR_ADDRESS``."""

    model_config = SettingsConfigDict(env_prefix="FEDLENS_")

    database_url: str = "sqlite:///fedlens.db"
    aggregator_address: str = "127.0.0.1:50151"

    @field_validator("aggregator_address")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {value!r}")
        return value
