"""Per-site credentials: expiring, rotated and revoked one site at a time; https; the audit log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from jipfed.central.audit import read_events
from jipfed.central.client import CentralClient, CentralError, require_https
from jipfed.central.credentials import (
    CredentialRefused,
    authenticate,
    issue_credential,
    load_credential,
    revoke_credential,
)
from jipfed.central.tokens import InvalidToken, issue_token, site_token, verify_token
from jipfed.cli import main
from jipfed.storage.local import LocalFolderStore
from jipfed.training.local import LocalTrainer

from .helpers import start, train


def test_token_claims_are_inside_the_hmac(secret: str) -> None:
    token = issue_token(secret, "site-a", "0123456789abcdef", 2_000_000_000)
    claims = verify_token(secret, token)
    assert (claims.site, claims.key_id, claims.expires_at) == ("site-a", "0123456789abcdef", 2_000_000_000)
    prefix, site, kid, expiry, mac = token.split(".")
    for forged in (
        f"{prefix}.{site}.{kid}.{int(expiry) + 86400}.{mac}",  # a later expiry
        f"{prefix}.site-b.{kid}.{expiry}.{mac}",  # another site
        f"{prefix}.{site}.fedcba9876543210.{expiry}.{mac}",  # another key id
    ):
        with pytest.raises(InvalidToken, match="HMAC mismatch"):
            verify_token(secret, forged)


def test_rotation_and_revocation_touch_one_site_only(local_store: LocalFolderStore, secret: str) -> None:
    a1, _ = issue_credential(local_store, secret, "site-a")
    b, _ = issue_credential(local_store, secret, "site-b")
    assert authenticate(local_store, secret, a1).site == "site-a"
    a2, _ = issue_credential(local_store, secret, "site-a")  # rotate site-a
    with pytest.raises(CredentialRefused) as rotated:
        authenticate(local_store, secret, a1)
    assert rotated.value.code == "rotated_token"
    assert authenticate(local_store, secret, a2).site == "site-a"
    assert authenticate(local_store, secret, b).site == "site-b"
    revoke_credential(local_store, "site-a")
    with pytest.raises(CredentialRefused) as revoked:
        authenticate(local_store, secret, a2)
    assert revoked.value.code == "revoked_token"
    assert authenticate(local_store, secret, b).site == "site-b"


def test_tokens_expire(local_store: LocalFolderStore, secret: str) -> None:
    token, record = issue_credential(local_store, secret, "site-a", days=1, now=1_000_000)
    assert authenticate(local_store, secret, token, now=record.expires_at - 1).site == "site-a"
    with pytest.raises(CredentialRefused) as expired:
        authenticate(local_store, secret, token, now=record.expires_at)
    assert expired.value.code == "expired_token"


def test_a_legacy_token_stops_working_once_the_site_is_registered(
    local_store: LocalFolderStore, secret: str
) -> None:
    legacy = site_token(secret, "site-a")
    assert authenticate(local_store, secret, legacy).legacy
    issue_credential(local_store, secret, "site-a")
    with pytest.raises(CredentialRefused, match="legacy token is no longer accepted"):
        authenticate(local_store, secret, legacy)


def test_the_endpoint_refuses_expired_and_revoked_tokens_with_their_codes(
    local_store: LocalFolderStore, serve, secret: str
) -> None:
    central = serve(local_store)
    start(local_store)
    expired, _ = issue_credential(local_store, secret, "site-a", days=1, now=time.time() - 2 * 86400)
    with pytest.raises(CentralError) as refused:
        CentralClient(central.url, expired).pending_work()
    assert (refused.value.status_code, refused.value.code) == (403, "expired_token")
    token_b, _ = issue_credential(local_store, secret, "site-b")
    assert [w.ticket.step for w in CentralClient(central.url, token_b).pending_work()] == [0]
    revoke_credential(local_store, "site-b")
    with pytest.raises(CentralError) as revoked:
        CentralClient(central.url, token_b).pending_work()
    assert (revoked.value.status_code, revoked.value.code) == (403, "revoked_token")


def test_cli_issues_rotates_and_revokes(
    tmp_path: Path, secret: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir = tmp_path / "store"
    monkeypatch.setenv("JIPFED_SITE_TOKEN_SECRET", secret)
    assert main(["site-token", "--store", str(store_dir), "--site", "site-a", "--days", "7"]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert "central public key" in out.err
    store = LocalFolderStore(store_dir)
    claims = authenticate(store, secret, token)
    record = load_credential(store, "site-a")
    assert (claims.key_id, claims.expires_at) == (record.key_id, record.expires_at)
    assert record.expires_at - record.issued_at == 7 * 86400
    assert main(["site-token", "--store", str(store_dir), "--revoke", "site-a"]) == 0
    assert "revoked" in capsys.readouterr().out
    with pytest.raises(CredentialRefused):
        authenticate(store, secret, token)
    assert main(["site-token", "--store", str(store_dir), "--revoke", "site-z"]) == 2
    assert "no credential record" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://central.example/jipfed", True),
        ("http://127.0.0.1:8080/jipfed", True),
        ("http://localhost/jipfed", True),
        ("http://[::1]:8080", True),
        ("http://central.example/jipfed", False),
        ("http://10.0.0.5/jipfed", False),
        ("ftp://central.example", False),
    ],
)
def test_the_client_requires_https_except_to_loopback(url: str, ok: bool) -> None:
    if ok:
        require_https(url)
        return
    with pytest.raises(ValueError, match="https|must be"):
        CentralClient(url, "jipfed.site-a." + "0" * 64)


def test_the_audit_log_records_who_uploaded_what(
    local_store: LocalFolderStore, serve, secret: str, trainers: dict[str, LocalTrainer]
) -> None:
    central = serve(local_store)
    start(local_store)
    token, record = issue_credential(local_store, secret, "site-a")
    a = CentralClient(central.url, token, timeout_s=30)
    [item] = a.pending_work()
    encoded = train(a, trainers["site-a"], "site-a", item)
    a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    with pytest.raises(CentralError):
        a.put_update("exp1", 0, encoded.payload, encoded.manifest.to_json())
    events = [e for e in read_events(local_store) if e["action"] == "update"]
    assert [(e["site"], e["outcome"], e["key_id"]) for e in events] == [
        ("site-a", "accepted", record.key_id),
        ("site-a", "duplicate", record.key_id),
    ]
    assert events[0]["sha256"] == encoded.manifest.sha256 and events[0]["round"] == 0
    downloads = [e for e in read_events(local_store) if e["action"] == "model"]
    assert [(e["site"], e["outcome"], e["step"]) for e in downloads] == [("site-a", "accepted", 0)]
