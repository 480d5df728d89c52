"""``fedlens keys identity|tls|enroll``, run through the command's entry point."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509

from fedlens.cli import main
from fedlens.identity import load_identity_key, load_identity_public
from server.identities import IdentityRegistry
from server.storage import Store


def err(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_keys_identity_writes_the_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert main(["keys", "identity", "--site-id", "site-1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert stat.S_IMODE((out / "site-1.key").stat().st_mode) == 0o600
    public = load_identity_public(out / "site-1.pub")
    assert load_identity_key(out / "site-1.key").public_key().public_bytes_raw() == public
    assert "fedlens keys enroll --site-id site-1" in printed
    assert "PRIVATE KEY" not in printed and public.hex() not in printed


def test_keys_identity_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keys", "identity", "--site-id", "site-1", "--out", str(tmp_path)]
    assert main(argv) == 0
    key = (tmp_path / "site-1.key").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert "refusing to overwrite" in err(capsys)
    assert (tmp_path / "site-1.key").read_bytes() == key


def test_keys_identity_bad_site_id_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "identity", "--site-id", "../x", "--out", str(tmp_path)]) == 2
    assert "site id '../x' must be" in err(capsys)


def test_keys_tls_defaults_to_localhost(tmp_path: Path) -> None:
    assert main(["keys", "tls", "--out", str(tmp_path)]) == 0
    leaf = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    for name in ("ca.key", "server.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600


def test_keys_tls_given_hosts_and_bad_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keys", "tls", "--out", str(tmp_path), "--host", "coord.example.org", "--host", "::1"]
    assert main(argv) == 0
    leaf = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["coord.example.org"]
    capsys.readouterr()
    assert main(["keys", "tls", "--out", str(tmp_path / "x"), "--host", "not a host"]) == 2
    assert "'not a host' is neither an IP address nor a DNS name" in err(capsys)
    assert main(["keys", "tls", "--out", str(tmp_path / "y"), "--days", "0"]) == 2
    assert "days must be >= 1" in err(capsys)


def test_keys_enroll_from_file_and_hex(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fedlens.db'}"
    keys = tmp_path / "keys"
    assert main(["keys", "identity", "--site-id", "site-1", "--out", str(keys)]) == 0
    assert main(["keys", "identity", "--site-id", "site-2", "--out", str(keys)]) == 0
    enroll = ["keys", "enroll", "--database-url", url]
    assert main([*enroll, "--site-id", "site-1", "--public-key", str(keys / "site-1.pub")]) == 0
    hex2 = (keys / "site-2.pub").read_text().strip()
    assert main([*enroll, "--site-id", "site-2", "--public-key", hex2]) == 0
    assert "site site-2: enrolled" in capsys.readouterr().out

    # site-1 gets site-2's key: refused, then replaced on purpose
    assert main([*enroll, "--site-id", "site-1", "--public-key", hex2]) == 2
    assert "site-1 is already enrolled with key" in err(capsys)
    assert main([*enroll, "--site-id", "site-1", "--public-key", hex2, "--replace"]) == 0
    assert "site site-1: replaced" in capsys.readouterr().out

    store = Store(url)
    try:
        assert IdentityRegistry(store).enrolled() == {
            "site-1": bytes.fromhex(hex2),
            "site-2": bytes.fromhex(hex2),
        }
        assert [e.outcome for e in store.audit_entries()] == [
            "enrolled",
            "enrolled",
            "refused",
            "replaced",
        ]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("01" + "00" * 31, "a point of small order"),
        ("missing.pub", "does not exist"),
    ],
)
def test_keys_enroll_bad_key_exits_2_and_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'fedlens.db'}"
    argv = ["keys", "enroll", "--database-url", url, "--site-id", "site-1", "--public-key", key]
    assert main(argv) == 2
    assert message in err(capsys)
    store = Store(url)
    try:
        assert IdentityRegistry(store).enrolled() == {}
        assert [e.outcome for e in store.audit_entries()] == ["refused"]
    finally:
        store.close()


def test_server_needs_both_tls_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'fedlens.db'}"
    argv = ["server", "--database-url", url, "--tls-cert", str(tmp_path / "server.pem")]
    assert main(argv) == 2
    assert "--tls-cert and --tls-key go together" in err(capsys)


def test_query_with_an_unreadable_ca_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["query", "releases", "--address", "127.0.0.1:1", "--tls-ca", str(tmp_path / "ca.pem")]
    assert main(argv) == 2
    assert f"TLS CA certificate {tmp_path / 'ca.pem'} does not exist" in err(capsys)
