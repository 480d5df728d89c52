"""Site identity keys and the test PKI: files, modes, round trips and refusals."""

from __future__ import annotations

import ipaddress
import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder
from cryptography.x509.verification import Store as TrustStore
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlens.errors import ConfigurationError
from fedlens.identity import (
    check_public_key,
    create_identity,
    create_test_pki,
    fingerprint,
    load_identity_key,
    load_identity_public,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
P = 2**255 - 19
D = (-121665 * pow(121666, -1, P)) % P
# RFC 8032 §7.1, TEST 1: a public key that must be accepted.
RFC8032_PUBLIC = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- identity files ----------------------------------------------------------------------------


def test_create_identity_writes_a_private_pem_0600_and_a_hex_public_key(tmp_path: Path) -> None:
    files = create_identity(tmp_path / "keys", "site-1")
    assert files.private_key == tmp_path / "keys" / "site-1.key"
    assert files.public_key_file == tmp_path / "keys" / "site-1.pub"
    assert _mode(files.private_key) == 0o600
    assert files.private_key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    text = files.public_key_file.read_text()
    assert text == files.public_key.hex() + "\n" and len(files.public_key) == 32


def test_keys_round_trip_and_sign(tmp_path: Path) -> None:
    files = create_identity(tmp_path, "hospital_a.eu")
    key = load_identity_key(files.private_key)
    public = load_identity_public(files.public_key_file)
    assert public == _raw(key) == files.public_key
    assert load_identity_public(str(files.public_key_file)) == public
    assert load_identity_public(public.hex()) == public
    assert load_identity_public(public.hex().upper()) == public
    signature = key.sign(b"advertisement")
    Ed25519PublicKey.from_public_bytes(public).verify(signature, b"advertisement")


def test_two_identities_differ(tmp_path: Path) -> None:
    a, b = create_identity(tmp_path, "a"), create_identity(tmp_path, "b")
    assert a.public_key != b.public_key and a.fingerprint != b.fingerprint


@pytest.mark.parametrize("existing", ["site-1.key", "site-1.pub"])
def test_create_identity_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("keep me")
    with pytest.raises(ConfigurationError, match="refusing to overwrite .*" + existing):
        create_identity(tmp_path, "site-1")
    assert (tmp_path / existing).read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_second_create_keeps_the_first_key(tmp_path: Path) -> None:
    first = create_identity(tmp_path, "site-1")
    before = first.private_key.read_bytes()
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        create_identity(tmp_path, "site-1")
    assert first.private_key.read_bytes() == before


@pytest.mark.parametrize("site_id", ["", "-site", "../etc/passwd", "a/b", "site 1", "x" * 129])
def test_invalid_site_ids_are_refused(tmp_path: Path, site_id: str) -> None:
    with pytest.raises(ConfigurationError, match="site id"):
        create_identity(tmp_path, site_id)
    assert list(tmp_path.iterdir()) == []


def test_no_key_material_in_repr_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fedlens")
    files = create_identity(tmp_path, "site-1")
    key = load_identity_key(files.private_key)
    pem_body = "".join(files.private_key.read_text().splitlines()[1:-1])
    private_hex = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    ).hex()
    shown = repr(files) + str(files) + caplog.text
    assert pem_body not in shown and private_hex not in shown
    assert files.public_key.hex() not in repr(files) and files.fingerprint in repr(files)
    assert private_hex not in repr(key)


def test_a_key_others_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = create_identity(tmp_path, "site-1")
    files.private_key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="fedlens.identity"):
        load_identity_key(files.private_key)
    assert "accessible to other users" in caplog.text and str(files.private_key) in caplog.text


# -- refusals when loading ---------------------------------------------------------------------


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_load_identity_key_refusals_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.key"
    with pytest.raises(ConfigurationError, match=f"{missing} does not exist"):
        load_identity_key(missing)
    with pytest.raises(ConfigurationError, match=f"{tmp_path} is a directory"):
        load_identity_key(tmp_path)
    garbage = _write(tmp_path / "garbage.key", b"not a key at all")
    with pytest.raises(ConfigurationError, match=f"{garbage} is not a PEM private key"):
        load_identity_key(garbage)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    wrong = _write(
        tmp_path / "ec.key",
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    with pytest.raises(ConfigurationError, match=f"{wrong} holds a ECDSA key, not an Ed25519"):
        load_identity_key(wrong)
    encrypted = _write(
        tmp_path / "enc.key",
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    )
    with pytest.raises(ConfigurationError, match=f"{encrypted} is encrypted"):
        load_identity_key(encrypted)


def test_a_refused_key_file_is_not_quoted(tmp_path: Path) -> None:
    secretish = "-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n"
    path = _write(tmp_path / "bad.key", secretish.encode())
    with pytest.raises(ConfigurationError) as info:
        load_identity_key(path)
    assert "TOPSECRET" not in str(info.value)


def test_load_identity_public_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_identity_public(tmp_path / "nope.pub")
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_identity_public("ab" * 31)  # too short for hex, so taken as a file name
    short = _write(tmp_path / "short.pub", b"ab" * 31 + b"\n")
    with pytest.raises(ConfigurationError, match=f"{short} must hold one line of 64 hex"):
        load_identity_public(short)
    pem = _write(
        tmp_path / "pem.pub",
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
    )
    with pytest.raises(ConfigurationError, match=f"{pem} must hold one line"):
        load_identity_public(pem)
    identity = _write(tmp_path / "identity.pub", (b"01" + b"00" * 31) + b"\n")
    with pytest.raises(ConfigurationError, match=f"{identity}: a point of small order"):
        load_identity_public(identity)


# -- public key validation ---------------------------------------------------------------------


def test_rfc8032_public_key_is_accepted() -> None:
    raw = bytes.fromhex(RFC8032_PUBLIC)
    assert check_public_key(raw) == raw


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_every_generated_public_key_is_accepted(seed: bytes) -> None:
    raw = _raw(Ed25519PrivateKey.from_private_bytes(seed))
    assert check_public_key(raw) == raw


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_wrong_length_is_refused(length: int) -> None:
    with pytest.raises(ConfigurationError, match=f"32 bytes, got {length}"):
        check_public_key(bytes(length))


def _encode(y: int, sign: int = 0) -> bytes:
    return (y | (sign << 255)).to_bytes(32, "little")


@pytest.mark.parametrize(
    "raw",
    [
        _encode(1),  # the neutral element
        _encode(P - 1),  # (0, -1), order 2
        _encode(0),  # (±sqrt(-1), 0), order 4
        _encode(0, sign=1),
    ],
)
def test_small_order_points_are_refused(raw: bytes) -> None:
    with pytest.raises(ConfigurationError, match="small order"):
        check_public_key(raw, source="site-9")


def test_non_canonical_and_negative_zero_encodings_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="not a point"):
        check_public_key(_encode(P + 3))  # y >= p
    with pytest.raises(ConfigurationError, match="not a point"):
        check_public_key(_encode(1, sign=1))  # x = 0 with the sign bit set


def test_points_off_the_curve_are_refused_exactly_when_x_squared_is_no_square() -> None:
    # Euler's criterion decides independently whether x² = (y² - 1) / (d y² + 1) has a root.
    refused = 0
    for y in range(2, 80):
        x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
        on_curve = pow(x2, (P - 1) // 2, P) != P - 1
        raw = _encode(y)
        if on_curve:
            assert check_public_key(raw) == raw
        else:
            refused += 1
            with pytest.raises(ConfigurationError, match="not a point of the Ed25519 curve"):
                check_public_key(raw)
    assert refused > 10


def test_fingerprint_is_stable_and_short() -> None:
    raw = bytes.fromhex(RFC8032_PUBLIC)
    assert fingerprint(raw) == fingerprint(bytes(raw))
    assert fingerprint(raw).startswith("SHA256:") and len(fingerprint(raw)) == 7 + 16


# -- test PKI ----------------------------------------------------------------------------------


def test_test_pki_files_modes_and_certificates(tmp_path: Path) -> None:
    files = create_test_pki(tmp_path / "tls", ["localhost", "127.0.0.1", "::1"], now=NOW, days=7)
    for key in (files.ca_key, files.server_key):
        assert _mode(key) == 0o600
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert isinstance(loaded.curve, ec.SECP256R1)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.issuer == ca.subject
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert leaf.not_valid_after_utc == NOW + timedelta(days=7)
    assert leaf.not_valid_before_utc <= NOW


@pytest.mark.parametrize(
    "subject", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
)
def test_server_certificate_verifies_under_the_ca(
    tmp_path: Path, subject: x509.DNSName | x509.IPAddress
) -> None:
    files = create_test_pki(tmp_path, ["localhost", "127.0.0.1"], now=NOW)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    verifier = (
        PolicyBuilder()
        .store(TrustStore([ca]))
        .time(NOW + timedelta(days=1))
        .build_server_verifier(subject)
    )
    chain = verifier.verify(leaf, [])
    assert chain[-1] == ca


def test_test_pki_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least one host"):
        create_test_pki(tmp_path, [], now=NOW)
    with pytest.raises(ConfigurationError, match="days must be >= 1"):
        create_test_pki(tmp_path, ["localhost"], now=NOW, days=0)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        create_test_pki(tmp_path, ["localhost"], now=datetime(2026, 3, 1))
    for host in ("bad host", "-bad.example", "exa_mple.org", "a..b"):
        with pytest.raises(ConfigurationError, match="neither an IP address nor a DNS name"):
            create_test_pki(tmp_path, ["localhost", host], now=NOW)
    assert list(tmp_path.iterdir()) == []
    create_test_pki(tmp_path, ["localhost"], now=NOW)
    before = (tmp_path / "ca.key").read_bytes()
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        create_test_pki(tmp_path, ["localhost"], now=NOW)
    assert (tmp_path / "ca.key").read_bytes() == before
