"""Process settings, validated once at the boundary (environment prefix ``FEDLENS_``).

What a run trains and explains is the run configuration (:mod:`fedlens.runconfig`); what a
site allows is its node configuration (:mod:`client.site_config`). These settings say
where a coordinator keeps its store, where clients find it, and the TLS files of both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """``FEDLENS_DATABASE_URL``, ``FEDLENS_AGGREGATOR_ADDRESS``, the TLS files and tokens.

    ``FEDLENS_AUTH`` (``token`` or ``off``) says whether the coordinator checks tokens;
    ``FEDLENS_TOKEN`` is the token a client presents; ``FEDLENS_ADMIN_TOKEN`` an admin
    token the coordinator registers when it starts.

    ``FEDLENS_ENROLMENT`` (``first-use`` or ``strict``) says how the coordinator admits
    site identity keys. ``FEDLENS_TLS_CERT`` and ``FEDLENS_TLS_KEY`` are the
    coordinator's certificate chain and private key (PEM); ``FEDLENS_TLS_CA`` is the CA
    certificate clients trust. Unset, the gRPC channel is plaintext.

    ``FEDLENS_DASHBOARD`` is the ``host:port`` the coordinator serves its web dashboard
    on; empty (the default), it serves none.
    """

    model_config = SettingsConfigDict(env_prefix="FEDLENS_")

    database_url: str = "sqlite:///fedlens.db"
    aggregator_address: str = "127.0.0.1:50151"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # "first-use": a site's first signed key advertisement enrols its identity key;
    # "strict": only sites an admin enrolled (`fedlens keys enroll`) may take part.
    enrolment: Literal["first-use", "strict"] = "first-use"
    # "token": every analyst and coordinator call needs a token (`fedlens admin token`);
    # "off": every call is open (a coordinator on loopback for one user).
    auth: Literal["token", "off"] = "token"
    # The token this process presents (analysts' CLI, the coordinator's ServerApp).
    token: SecretStr | None = None
    # An admin token the coordinator registers at start-up (a deployment's shared secret).
    admin_token: SecretStr | None = None
    # host:port of the coordinator's web dashboard; "" serves none.
    dashboard: str = ""

    @property
    def token_value(self) -> str | None:
        """``FEDLENS_TOKEN`` in the clear, for the call metadata; None if unset."""
        return self.token.get_secret_value() if self.token is not None else None

    @field_validator("tls_cert", "tls_key", "tls_ca", "token", "admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("aggregator_address", "dashboard")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value == "":
            return value
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, got {value!r}")
        return value
