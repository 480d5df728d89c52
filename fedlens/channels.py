"""gRPC channels to the coordinator and the coordinator's TLS credentials.

With a CA certificate a client opens a TLS channel and checks that the server's
certificate chains to that CA and names the host it dialled (its SubjectAlternativeName);
without one the channel is plaintext, for loopback and trusted networks only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from fedlens.errors import ConfigurationError

__all__ = ["bearer_metadata", "describe_target", "open_channel", "server_credentials"]


def open_channel(
    address: str, *, tls_ca: Path | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to ``address`` (``host:port``): TLS trusting ``tls_ca`` if given, else plaintext.

    Parameters
    ----------
    address
        ``host:port``; with TLS the host must be one the server certificate names.
    tls_ca
        PEM file of the CA certificate(s) that signed the server's certificate.
    options
        gRPC channel options, such as message size limits.

    Raises
    ------
    ConfigurationError
        ``tls_ca`` is missing, unreadable or holds no PEM certificate.
    """
    if tls_ca is None:
        return grpc.insecure_channel(address, options=list(options))
    roots = _read_pem_certificates(Path(tls_ca), "TLS CA certificate")
    credentials = grpc.ssl_channel_credentials(root_certificates=roots)
    return grpc.secure_channel(address, credentials, options=list(options))


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``token`` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def describe_target(address: str, tls_ca: Path | None) -> str:
    """``address`` and how a channel reaches it, for error messages."""
    if tls_ca is None:
        return f"{address} (plaintext; a server with TLS needs its CA certificate)"
    return f"{address} (TLS, trusting {tls_ca})"


def server_credentials(cert_chain: Path, private_key: Path) -> grpc.ServerCredentials:
    """TLS credentials of a server from its certificate chain and private key (PEM files).

    Raises
    ------
    ConfigurationError
        A file is missing or unreadable, holds no PEM certificate or private key, or the key
        does not belong to the chain's first certificate. Messages name the file, never
        the key's content.
    """
    chain = _read_pem_certificates(Path(cert_chain), "TLS certificate")
    key_pem = _read(Path(private_key), "TLS private key")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigurationError(
            f"TLS private key {private_key} is encrypted; give an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError(
            f"TLS private key {private_key} is not a PEM private key"
        ) from None
    leaf = x509.load_pem_x509_certificates(chain)[0]
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise ConfigurationError(
            f"TLS private key {private_key} does not belong to the certificate in {cert_chain}"
        )
    return grpc.ssl_server_credentials([(key_pem, chain)])


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _read_pem_certificates(path: Path, what: str) -> bytes:
    data = _read(path, what)
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigurationError(f"{what} {path} holds no PEM certificate") from None
    return data


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None
