"""Site tokens: HMAC of the site id under the central's secret, verified in constant time."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from jipfed.central.tokens import MIN_SECRET_CHARS, InvalidToken, site_token, verify_site_token
from jipfed.cli import main

SECRET = "central-secret-" + "0123456789abcdef" * 2


def test_token_is_the_documented_hmac_and_verifies_to_its_site() -> None:
    token = site_token(SECRET, "site-a")
    mac = hmac.new(SECRET.encode(), b"jipfed-site-token:site-a", hashlib.sha256).hexdigest()
    assert token == f"jipfed.site-a.{mac}"
    assert verify_site_token(SECRET, token) == "site-a"
    assert site_token(SECRET, "site-b") != token.replace("site-a", "site-b")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (site_token("another-secret-" + "x" * 32, "site-a"), "not issued by this central"),
        ("jipfed.site-b." + site_token(SECRET, "site-a").rsplit(".", 1)[1], "not issued by this central"),
        ("jipfed.site-a", "malformed"),
        ("bearer.site-a." + "0" * 64, "malformed"),
        ("jipfed.site-a." + "0" * 63, "64 hex digits"),
        ("jipfed.../x." + "0" * 64, "malformed"),
        ("jipfed.-site." + "0" * 64, "invalid site id"),
        ("jipfed.site-a." + "é" * 64, "not issued by this central"),
    ],
)
def test_invalid_tokens_are_refused_without_echoing_the_secret(token: str, reason: str) -> None:
    with pytest.raises(InvalidToken, match=reason) as info:
        verify_site_token(SECRET, token)
    assert SECRET not in str(info.value)


def test_secret_must_be_long_enough_and_site_a_slug() -> None:
    short = "s" * (MIN_SECRET_CHARS - 1)
    for call in (
        lambda: site_token(short, "site-a"),
        lambda: verify_site_token(short, "jipfed.a." + "0" * 64),
    ):
        with pytest.raises(ValueError, match=f"at least {MIN_SECRET_CHARS} characters") as info:
            call()
        assert short not in str(info.value)
    with pytest.raises(ValueError, match="invalid site id"):
        site_token(SECRET, "site.a")


def test_cli_prints_a_legacy_token_from_a_secret_file_or_the_environment(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    assert main(["site-token", "--legacy", "--site", "site-a", "--secret-file", str(secret_file)]) == 0
    assert capsys.readouterr().out.strip() == site_token(SECRET, "site-a")
    monkeypatch.setenv("JIPFED_SITE_TOKEN_SECRET", SECRET)
    assert main(["site-token", "--legacy", "--site", "site-b"]) == 0
    assert verify_site_token(SECRET, capsys.readouterr().out.strip()) == "site-b"
    monkeypatch.delenv("JIPFED_SITE_TOKEN_SECRET")
    assert main(["site-token", "--legacy", "--site", "site-b"]) == 2
    assert "JIPFED_SITE_TOKEN_SECRET" in capsys.readouterr().err
    assert main(["site-token", "--site", "site-b"]) == 2  # a registered token needs the store
    assert "--store is required" in capsys.readouterr().err
