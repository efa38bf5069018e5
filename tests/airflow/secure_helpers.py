"""Checks shared by the end-to-end secure-aggregation tests (pull and push transport)."""

from __future__ import annotations

from typing import Any

from jipfed.storage.state import ExperimentStore


def assert_only_masked_updates(exp_store: ExperimentStore, round_: int, masked: int) -> None:
    """The round's store holds ``masked`` masked vectors and no unmasked site update at all."""
    keys = exp_store.store.list(exp_store.layout.round_prefix(round_))
    assert not [k for k in keys if "/updates/" in k], "an unmasked site update was stored"
    assert len([k for k in keys if "/masked/" in k and k.endswith(".safetensors")]) == masked


def assert_secure_round(
    exp_store: ExperimentStore, round_: int, included: list[str], dropped: dict[str, str] | None = None
) -> dict[str, Any]:
    """The round record lists ``included`` as aggregated by secure aggregation and each site of
    ``dropped`` as missing with its reason containing the given text (one failed attempt then)."""
    dropped = dropped or {}
    record = exp_store.load_aggregate(round_)
    assert record["included"] == included and record["missing"] == sorted(dropped), record
    for site, reason in dropped.items():
        assert reason in record["missing_reasons"][site], record["missing_reasons"]
    secure = record["secure_aggregation"]
    assert secure["sites"] == included and secure["attempt"] == (1 if dropped else 0)
    assert [sorted(r["dropped"]) for r in secure["retries"]] == ([sorted(dropped)] if dropped else [])
    return record
