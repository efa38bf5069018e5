"""Signed updates (sites) and signed models (central), Ed25519, over the real endpoint."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from jipfed.central.client import CentralClient, CentralError, CentralRefused
from jipfed.central.credentials import issue_credential
from jipfed.central.model_signing import central_public_key
from jipfed.federation.signing import (
    SignatureInvalid,
    generate_private_key,
    load_public_key,
    private_key_pem,
    public_key_raw,
    sign,
    update_statement,
    verify,
)
from jipfed.storage.layout import signature_key
from jipfed.storage.local import LocalFolderStore
from jipfed.training.local import LocalTrainer

from .helpers import start, train


def test_a_statement_binds_experiment_round_step_site_config_and_bytes() -> None:
    key = generate_private_key()
    manifest = {"experiment": "e", "round": 1, "site": "a", "config_hash": "c" * 64, "sha256": "d" * 64}
    text = '{"n_samples": 3}'
    signature = sign(key, update_statement(manifest, text, 1))
    verify(public_key_raw(key), update_statement(manifest, text, 1), signature, "u")
    for changed in (
        update_statement(manifest, text, 2),
        update_statement({**manifest, "round": 0}, text, 1),
        update_statement({**manifest, "experiment": "f"}, text, 1),
        update_statement({**manifest, "config_hash": "0" * 64}, text, 1),
        update_statement({**manifest, "sha256": "e" * 64}, text, 1),
        update_statement(manifest, '{"n_samples": 300}', 1),
    ):
        with pytest.raises(SignatureInvalid) as bad:
            verify(public_key_raw(key), changed, signature, "u")
        assert bad.value.code == "bad_signature"
    with pytest.raises(SignatureInvalid) as unsigned:
        verify(public_key_raw(key), update_statement(manifest, text, 1), None, "u")
    assert unsigned.value.code == "unsigned"
    pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    assert (
        load_public_key(pem) == load_public_key(base64.b64encode(public_key_raw(key))) == public_key_raw(key)
    )
    assert b"PRIVATE KEY" in private_key_pem(key)


def test_only_an_update_signed_by_the_sites_registered_key_for_this_step_is_accepted(
    local_store: LocalFolderStore, serve, secret: str, trainers: dict[str, LocalTrainer]
) -> None:
    central = serve(local_store)
    exp_store = start(local_store)
    key_a, key_b = generate_private_key(), generate_private_key()
    token_a, _ = issue_credential(local_store, secret, "site-a", public_key=public_key_raw(key_a))
    pinned = central_public_key(secret)
    plain = CentralClient(central.url, token_a, central_public_key=pinned)
    [item] = plain.pending_work()
    encoded = train(plain, trainers["site-a"], "site-a", item)
    body = (encoded.payload, encoded.manifest.to_json())
    refusals = {}
    with pytest.raises(CentralRefused) as unsigned:
        plain.put_update("exp1", 0, *body)
    refusals["unsigned"] = unsigned.value.code
    with pytest.raises(CentralRefused) as other:  # signed with site-b's key
        CentralClient(central.url, token_a, signing_key=key_b).put_update("exp1", 0, *body, step=0)
    refusals["other site's key"] = other.value.code
    with pytest.raises(CentralRefused) as retargeted:  # signed for another step
        CentralClient(central.url, token_a, signing_key=key_a).put_update("exp1", 0, *body, step=1)
    refusals["re-targeted"] = retargeted.value.code
    assert refusals == {
        "unsigned": "unsigned",
        "other site's key": "bad_signature",
        "re-targeted": "bad_signature",
    }
    assert exp_store.list_updates(0) == [] and not local_store.exists(exp_store.layout.update(0, "site-a"))
    signed = CentralClient(central.url, token_a, signing_key=key_a)
    assert signed.put_update("exp1", 0, *body, step=0)["site"] == "site-a"
    stored = local_store.get_bytes(exp_store.layout.update_signature(0, "site-a")).decode()
    verify(public_key_raw(key_a), update_statement(encoded.manifest.to_dict(), body[1], 0), stored, "stored")


def test_sites_verify_the_centrals_signature_of_the_model(
    local_store: LocalFolderStore, serve, secret: str
) -> None:
    central = serve(local_store)
    exp_store = start(local_store)
    token, _ = issue_credential(local_store, secret, "site-a")
    payload, manifest = CentralClient(
        central.url, token, central_public_key=central_public_key(secret)
    ).get_model("exp1", 0, 0)
    assert local_store.exists(signature_key(exp_store.layout.global_model(0)))
    wrong = base64.b64encode(public_key_raw(generate_private_key())).decode()
    with pytest.raises(CentralError) as forged:
        CentralClient(central.url, token, central_public_key=wrong).get_model("exp1", 0, 0)
    assert forged.value.code == "bad_signature"
    # The manifest changed after the central signed the model: the central refuses to serve it.
    changed = {**manifest, "created_at": "2030-01-01T00:00:00+00:00"}
    local_store.put_json(exp_store.layout.global_manifest(0), changed, overwrite=True)
    with pytest.raises(CentralError) as tampered:
        CentralClient(central.url, token, central_public_key=central_public_key(secret)).get_model(
            "exp1", 0, 0
        )
    assert tampered.value.status_code == 500
