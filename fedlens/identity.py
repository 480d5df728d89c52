"""Site identity keys (Ed25519) and a test PKI for the coordinator's TLS.

A site's identity is an Ed25519 key pair. The private key stays at the site in
``<site_id>.key`` (PKCS8 PEM, mode 0600); the public key travels to the coordinator as
``<site_id>.pub``, the raw 32 bytes in hex on one line, and the coordinator's
administrator enrols it (:class:`server.identities.IdentityRegistry`). Secure aggregation
signs key advertisements with it (Bonawitz et al., CCS 2017, §6).

:func:`create_test_pki` writes a throwaway certificate authority and a server certificate
for test deployments. Its certificates are ECDSA P-256 with SHA-256: gRPC's TLS
(BoringSSL) refuses Ed25519 server certificates during the handshake
(``NO_COMMON_SIGNATURE_ALGORITHMS``).

Private key material never appears in a ``repr``, a log line or an error message; errors
name the file.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from hashlib import sha256
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlens.errors import ConfigurationError

__all__ = [
    "PUBLIC_KEY_BYTES",
    "IdentityFiles",
    "TlsFiles",
    "check_public_key",
    "check_site_id",
    "create_identity",
    "create_test_pki",
    "fingerprint",
    "load_identity_key",
    "load_identity_public",
]

logger = logging.getLogger(__name__)

PUBLIC_KEY_BYTES = 32

# Site ids name files and database rows: a letter or digit, then letters, digits, '.', '_', '-'.
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
# Certificates start this long before ``now``, so a peer whose clock lags still accepts them.
_BACKDATE = timedelta(hours=1)


@dataclass(frozen=True)
class IdentityFiles:
    """The files :func:`create_identity` wrote.

    Attributes
    ----------
    site_id
        The site the identity belongs to.
    private_key
        ``<site_id>.key``: PKCS8 PEM, unencrypted, mode 0600. Stays at the site.
    public_key_file
        ``<site_id>.pub``: the raw public key in hex. Goes to the coordinator.
    public_key
        The raw 32-byte public key (shown in ``repr`` only as its fingerprint).
    """

    site_id: str
    private_key: Path
    public_key_file: Path
    public_key: bytes = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)

    def __repr__(self) -> str:
        return (
            f"IdentityFiles(site_id={self.site_id!r}, private_key={str(self.private_key)!r}, "
            f"public_key_file={str(self.public_key_file)!r}, public_key={self.fingerprint})"
        )


@dataclass(frozen=True)
class TlsFiles:
    """The files :func:`create_test_pki` wrote (certificates PEM, keys PKCS8 PEM, 0600)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def check_site_id(site_id: str) -> str:
    """``site_id`` if it is a valid site id (it names files and rows), else ConfigurationError."""
    if not _SITE_ID.fullmatch(site_id):
        raise ConfigurationError(
            f"site id {site_id!r} must be 1-128 characters: a letter or digit, then letters, "
            "digits, '.', '_' or '-'"
        )
    return site_id


def fingerprint(public_key: bytes) -> str:
    """A short, printable name of a public key: ``SHA256:`` and 16 hex digits of its hash."""
    return "SHA256:" + sha256(public_key).hexdigest()[:16]


def create_identity(out_dir: Path, site_id: str) -> IdentityFiles:
    """Generate a site's Ed25519 identity key pair and write it to ``out_dir``.

    The key comes from the operating system's CSPRNG (through OpenSSL).

    Raises
    ------
    ConfigurationError
        The site id is invalid, either file already exists (nothing is overwritten), or
        the directory cannot be written.
    """
    check_site_id(site_id)
    key_path = out_dir / f"{site_id}.key"
    pub_path = out_dir / f"{site_id}.pub"
    _refuse_existing(key_path, pub_path)
    _make_dir(out_dir)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    _write_new(key_path, pem, mode=0o600)
    _write_new(pub_path, (public.hex() + "\n").encode("ascii"), mode=0o644)
    logger.info("wrote identity of %s (%s) to %s", site_id, fingerprint(public), out_dir)
    return IdentityFiles(site_id, key_path, pub_path, public)


def load_identity_key(path: Path) -> Ed25519PrivateKey:
    """Read a site's private identity key (PKCS8 PEM, unencrypted).

    Raises
    ------
    ConfigurationError
        The file is missing or unreadable, is not a PEM private key, is encrypted, or holds
        a key of another type. The message names the file, never its content.
    """
    path = Path(path)
    data = _read(path, "identity key")
    _warn_if_exposed(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigurationError(
            f"identity key {path} is encrypted; fedlens reads unencrypted PKCS8 PEM keys"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigurationError(
            f"identity key {path} is not a PEM private key (expected PKCS8 PEM from "
            "`fedlens keys identity`)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(
            f"identity key {path} holds a {_key_type(key)} key, not an Ed25519 identity key"
        )
    return key


def load_identity_public(source: Path | str) -> bytes:
    """A site's raw 32-byte public identity key, from a ``.pub`` file or its hex text.

    ``source`` is a :class:`~pathlib.Path`, or a string: 64 hex digits are taken as the key
    itself, anything else as a file name.

    Raises
    ------
    ConfigurationError
        The file is missing or unreadable, or the text is not 64 hex digits of a valid
        Ed25519 public key.
    """
    if isinstance(source, str) and _HEX_KEY.fullmatch(source.strip()):
        return check_public_key(bytes.fromhex(source.strip()), source="the given hex key")
    path = Path(source)
    text = _read(path, "public identity key").decode("ascii", errors="replace").strip()
    if not _HEX_KEY.fullmatch(text):
        raise ConfigurationError(
            f"public identity key {path} must hold one line of 64 hex digits "
            "(the raw Ed25519 key, as `fedlens keys identity` writes it)"
        )
    return check_public_key(bytes.fromhex(text), source=str(path))


def check_public_key(raw: bytes, *, source: str = "public key") -> bytes:
    """``raw`` if it is a usable Ed25519 public key, else ConfigurationError naming ``source``.

    Usable means 32 bytes that decode to a curve point as RFC 8032 §5.1.3 specifies
    (canonical y, x recoverable, no negative zero), and a point whose order is not small:
    the eight points of order dividing 8 would let anyone forge signatures that verify
    under some implementations. OpenSSL accepts any 32 bytes as a key, hence this check.
    """
    if len(raw) != PUBLIC_KEY_BYTES:
        raise ConfigurationError(
            f"{source}: an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(raw)}"
        )
    point = _decode_point(raw)
    if point is None:
        raise ConfigurationError(f"{source}: not a point of the Ed25519 curve")
    if _has_small_order(point):
        raise ConfigurationError(f"{source}: a point of small order, not a usable Ed25519 key")
    Ed25519PublicKey.from_public_bytes(raw)
    return bytes(raw)


# -- Ed25519 point arithmetic (RFC 8032 §5.1), only to validate public keys ---------------

_P = 2**255 - 19
_D = (-121665 * pow(121666, -1, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    encoded = int.from_bytes(raw, "little")
    sign, y = encoded >> 255, encoded & ((1 << 255) - 1)
    if y >= _P:
        return None
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        if (v * x * x + u) % _P != 0:
            return None
        x = (x * _SQRT_M1) % _P
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _add(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    # Complete affine addition on -x² + y² = 1 + d x² y² (d is not a square mod p).
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2 % _P
    x3 = (x1 * y2 + y1 * x2) * pow(1 + t, -1, _P) % _P
    y3 = (y1 * y2 + x1 * x2) * pow(1 - t, -1, _P) % _P
    return x3, y3


def _has_small_order(point: tuple[int, int]) -> bool:
    for _ in range(3):
        point = _add(point, point)
    return point == (0, 1)


# -- test PKI ------------------------------------------------------------------------------


def create_test_pki(
    out_dir: Path, hosts: Sequence[str], *, now: datetime, days: int = 30
) -> TlsFiles:
    """Write a self-signed CA and a server certificate it signs, for ``hosts``.

    For test deployments and demos only; production uses the operator's PKI. Writes
    ``ca.pem`` and ``ca.key`` (give ``ca.pem`` to every client) and ``server.pem`` and
    ``server.key`` (for ``fedlens server --tls-cert/--tls-key``). Both certificates are
    valid from an hour before ``now`` for ``days`` days; the server certificate's
    SubjectAlternativeName lists every host, as an IP address where it parses as one and
    as a DNS name otherwise. Keys are ECDSA P-256, mode 0600.

    Raises
    ------
    ConfigurationError
        No host, a host that is neither an IP address nor a DNS name, ``days`` < 1, a naive
        ``now``, or any of the four files already exists.
    """
    if not hosts:
        raise ConfigurationError("the server certificate needs at least one host")
    if days < 1:
        raise ConfigurationError(f"days must be >= 1, got {days}")
    if now.tzinfo is None:
        raise ConfigurationError("now must be timezone-aware (UTC)")
    names = [_subject_alt_name(h) for h in hosts]
    files = TlsFiles(
        ca_cert=out_dir / "ca.pem",
        ca_key=out_dir / "ca.key",
        server_cert=out_dir / "server.pem",
        server_key=out_dir / "server.key",
    )
    _refuse_existing(files.ca_cert, files.ca_key, files.server_cert, files.server_key)
    _make_dir(out_dir)
    start, end = now - _BACKDATE, now + timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlens test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    _write_new(files.ca_key, _private_pem(ca_key), mode=0o600)
    _write_new(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    _write_new(files.server_key, _private_pem(server_key), mode=0o600)
    _write_new(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    logger.info("wrote a test CA and a server certificate for %s to %s", ", ".join(hosts), out_dir)
    return files


def _subject_alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_is_dns_label(label) for label in labels):
        raise ConfigurationError(f"host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.rstrip(".").lower())


def _is_dns_label(label: str) -> bool:
    # A leading '*' label allows wildcard names such as *.example.org.
    return (
        label == "*"
        or re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", label) is not None
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# -- files ---------------------------------------------------------------------------------


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigurationError(
            f"refusing to overwrite {', '.join(existing)}: move or delete it first"
        )


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create directory {path}: {exc.strerror}") from None


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Create ``path`` with ``mode`` (never widened by the umask later) and write ``data``."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigurationError(f"refusing to overwrite {path}: move or delete it first") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {path}: {exc.strerror}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigurationError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigurationError(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror}") from None


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("identity key %s is accessible to other users (chmod 600 it)", path)


def _key_type(key: object) -> str:
    kinds = (
        (rsa.RSAPrivateKey, "RSA"),
        (ec.EllipticCurvePrivateKey, "ECDSA"),
        (dsa.DSAPrivateKey, "DSA"),
        (ed448.Ed448PrivateKey, "Ed448"),
        (x25519.X25519PrivateKey, "X25519"),
        (x448.X448PrivateKey, "X448"),
    )
    return next((name for cls, name in kinds if isinstance(key, cls)), "non-Ed25519")
