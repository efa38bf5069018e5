"""The central's signatures of the models it hands out (``global.sig`` / ``hops/<h>.sig``).

The central signs the model a step starts from with its Ed25519 key (derived from the site token
secret, :func:`jipfed.federation.signing.central_signing_key`) the first time a site downloads it
and stores the signature write-once next to the model. Ed25519 signatures are deterministic, so a
second signing of the same model gives the same bytes; a model or manifest changed after it was
signed gives a different signature and the write-once store refuses it (the download fails with
500 instead of handing out a model the central never signed).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from jipfed.federation.signing import central_signing_key, global_statement, public_key_raw, sign
from jipfed.storage.base import ModelStore
from jipfed.storage.layout import signature_key


def central_public_key(secret: str) -> str:
    """Base64 of the central's raw Ed25519 public key (what sites pin)."""
    return base64.b64encode(public_key_raw(central_signing_key(secret))).decode("ascii")


def signed_model(
    store: ModelStore, secret: str, model_key: str, manifest: Mapping[str, Any], step: int
) -> str:
    """The central's signature of the model at ``model_key`` for ``step``, stored once beside it.

    Raises:
        ObjectExistsError: a different signature is stored (the model or manifest changed).
    """
    signature = sign(central_signing_key(secret), global_statement(manifest, step))
    store.put_if_absent_or_same(signature_key(model_key), signature.encode("ascii"))
    return signature
