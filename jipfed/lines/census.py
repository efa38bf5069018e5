"""A line run's census: every site says how many new cases it has since the line's watermark.

The central opens a site request (:mod:`jipfed.federation.site_requests`, kind ``census``) under
``lines/<line>/runs/<slot>/census``; its body holds, per site, the watermark (``since``), the run
time (``as_of``) and the settings the site needs to predict what it will train on (replay size,
seed, held-out fraction). A site answers with counts only (:func:`answer_census`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from jipfed.federation import site_requests
from jipfed.federation.site_requests import SiteRequest
from jipfed.lines import selection
from jipfed.storage.base import ModelStore


def census_prefix(line: str, slot: str) -> str:
    return f"lines/{line}/runs/{slot}/census"


def request_census(
    store: ModelStore,
    *,
    line: str,
    slot: str,
    sites: Sequence[str],
    since: Mapping[str, str | None],
    as_of: str,
    replay: int,
    seed: int,
    val_fraction: float,
    timeout_s: float,
    now: datetime | None = None,
) -> SiteRequest:
    """Open (once) the census of ``line``'s run ``slot``."""
    body = {
        "line": line,
        "as_of": as_of,
        "since": {site: since.get(site) for site in sites},
        "replay": replay,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    return site_requests.open_request(
        store,
        kind="census",
        request_id=f"{line}.{slot}",
        prefix=census_prefix(line, slot),
        sites=sites,
        timeout_s=timeout_s,
        body=body,
        now=now,
    )


def pending_census(store: ModelStore, site: str, now: datetime | None = None) -> list[SiteRequest]:
    return site_requests.pending_requests(store, site, "census", now)


def site_counts(
    request: SiteRequest, site: str, data_root: Path | str, case_keys: Sequence[str]
) -> dict[str, int]:
    """The site's answer: new and total cases, and how many new / replay cases it would train on.

    Records ``case_keys`` in the site's ledger (they stay on site); held-out cases (the line's
    split) are never trained on.
    """
    from jipfed.training.data import CaseRecord, SiteData

    body = request.body
    since = body["since"].get(site)
    counts = selection.census(data_root, body["line"], case_keys, as_of=body["as_of"], since=since)
    records = SiteData(tuple(CaseRecord(key, Path(key), None, site) for key in case_keys))
    train, _ = records.split(float(body["val_fraction"]), int(body["seed"]))
    chosen = {
        "line": body["line"],
        "since": since,
        "until": body["as_of"],
        "replay": body["replay"],
        "seed": body["seed"],
    }
    _, planned = selection.select_training(data_root, train, chosen)
    return {**counts, "train_new": planned["new_cases"], "train_replay": planned["replay_cases"]}


def answer_census(
    store: ModelStore, request: SiteRequest, site: str, data_root: Path | str, case_keys: Sequence[str]
) -> dict[str, int]:
    """Count at ``site`` and record the answer (or the failure, re-raised)."""
    try:
        counts = site_counts(request, site, data_root, case_keys)
    except (OSError, ValueError) as exc:
        site_requests.fail(store, request, site, f"census failed: {exc}")
        raise
    site_requests.answer(store, request, site, counts)
    return counts


def census_result(
    store: ModelStore, request: SiteRequest, now: datetime | None = None
) -> dict[str, Any] | None:
    """``{"sites": {site: counts}, "failed": {site: reason}}``, or None while sites may still answer."""
    answers, failures, waiting = site_requests.collect(store, request, now)
    if waiting:
        return None
    site_requests.close_request(store, request)
    return {"sites": answers, "failed": failures}
