"""Small questions the central asks every site outside a training step, answered with numbers only.

A *site request* (a model line's census "how many new cases?", a federated evaluation "score
these models on your held-out cases") lives under a store prefix::

    <prefix>/request.json           kind, id, sites, deadline, body (what the sites need)
    <prefix>/sites/<site>.json      a site's answer (JSON numbers; never a case key or UID)
    <prefix>/failures/<site>.json   why a site could not answer

and in the index ``index/requests/<kind>/<id>.json`` while open, so a polling site reads only the
open ones (:func:`pending_requests`). Answers are write-once; one site's failure never blocks the
others; after the deadline :func:`collect` counts a silent site as failed with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from jipfed.storage.base import ModelStore, ObjectExistsError, canonical_json
from jipfed.storage.layout import validate_slug

REQUEST_FORMAT = 1
INDEX_PREFIX = "index/requests/"
MAX_REASON_CHARS = 2000
KINDS = ("census", "evaluate")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class SiteRequest:
    """One open question to a set of sites."""

    kind: str
    id: str
    prefix: str
    sites: tuple[str, ...]
    deadline: datetime
    body: Mapping[str, Any]

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.deadline

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REQUEST_FORMAT,
            "kind": self.kind,
            "id": self.id,
            "prefix": self.prefix,
            "sites": list(self.sites),
            "deadline": _iso(self.deadline),
            "body": dict(self.body),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteRequest:
        if not isinstance(data, Mapping) or data.get("format") != REQUEST_FORMAT:
            raise ValueError(f"not a site request (format {REQUEST_FORMAT}): {str(data)[:200]}")
        return cls(
            kind=str(data["kind"]),
            id=str(data["id"]),
            prefix=str(data["prefix"]),
            sites=tuple(data["sites"]),
            deadline=datetime.fromisoformat(data["deadline"]),
            body=dict(data["body"]),
        )


def _index_key(kind: str, request_id: str) -> str:
    return f"{INDEX_PREFIX}{kind}/{request_id}.json"


def open_request(
    store: ModelStore,
    *,
    kind: str,
    request_id: str,
    prefix: str,
    sites: Sequence[str],
    timeout_s: float,
    body: Mapping[str, Any],
    now: datetime | None = None,
) -> SiteRequest:
    """Store the request (once: an existing one under ``prefix`` is returned) and index it as open."""
    if kind not in KINDS:
        raise ValueError(f"request kind must be one of {KINDS}, got {kind!r}")
    for part in request_id.split("."):
        validate_slug(part, "request id part")
    for site in sites:
        validate_slug(site, "site id")
    key = f"{prefix}/request.json"
    if store.exists(key):
        return SiteRequest.from_dict(store.get_json(key))
    request = SiteRequest(
        kind=kind,
        id=request_id,
        prefix=prefix,
        sites=tuple(sites),
        deadline=(now or utcnow()) + timedelta(seconds=timeout_s),
        body=dict(body),
    )
    store.put_if_absent_or_same(key, canonical_json(request.to_dict()))
    store.put_json(_index_key(kind, request_id), {"prefix": prefix}, overwrite=True)
    return request


def load_request(store: ModelStore, prefix: str) -> SiteRequest:
    return SiteRequest.from_dict(store.get_json(f"{prefix}/request.json"))


def close_request(store: ModelStore, request: SiteRequest) -> None:
    """Drop the request from the open index (its records stay)."""
    key = _index_key(request.kind, request.id)
    if store.exists(key):
        store.delete(key)


def pending_requests(
    store: ModelStore, site: str, kind: str, now: datetime | None = None
) -> list[SiteRequest]:
    """Open requests of ``kind`` that select ``site`` and that it has not answered yet."""
    validate_slug(site, "site id")
    found = []
    for key in store.list(f"{INDEX_PREFIX}{kind}/"):
        request = load_request(store, store.get_json(key)["prefix"])
        if site not in request.sites or request.expired(now):
            continue
        if store.exists(answer_key(request, site)) or store.exists(failure_key(request, site)):
            continue
        found.append(request)
    return sorted(found, key=lambda r: r.id)


def answer_key(request: SiteRequest, site: str) -> str:
    return f"{request.prefix}/sites/{validate_slug(site, 'site id')}.json"


def failure_key(request: SiteRequest, site: str) -> str:
    return f"{request.prefix}/failures/{validate_slug(site, 'site id')}.json"


def _check_numbers(value: Any, where: str) -> None:
    """Answers hold JSON objects of finite numbers (and nested objects) only: nothing identifying."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > 64:
                raise ValueError(f"{where}: keys must be short strings, got {key!r}")
            _check_numbers(item, f"{where}.{key}")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: only finite numbers may leave a site, got {value!r}")


def answer(
    store: ModelStore,
    request: SiteRequest,
    site: str,
    numbers: Mapping[str, Any],
    now: datetime | None = None,
) -> None:
    """Record ``site``'s answer (an object of finite numbers); refused after the deadline or twice."""
    where = f"{request.kind} request {request.id!r}, site {site!r}"
    if site not in request.sites:
        raise PermissionError(f"{where}: the site is not asked")
    if request.expired(now):
        raise PermissionError(f"{where}: answer after the deadline {_iso(request.deadline)}")
    _check_numbers(numbers, where)
    try:
        store.put_bytes(answer_key(request, site), canonical_json(dict(numbers)))
    except ObjectExistsError:
        raise PermissionError(f"{where}: already answered") from None


def fail(store: ModelStore, request: SiteRequest, site: str, reason: str) -> None:
    """Record that ``site`` cannot answer (the reason is cut to MAX_REASON_CHARS)."""
    if site not in request.sites:
        raise PermissionError(f"{request.kind} request {request.id!r}: site {site!r} is not asked")
    store.put_json(failure_key(request, site), {"reason": str(reason)[:MAX_REASON_CHARS]}, overwrite=True)


def collect(
    store: ModelStore, request: SiteRequest, now: datetime | None = None
) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(answers by site, failure reasons by site, sites still waiting); after the deadline nobody waits."""
    answers: dict[str, Any] = {}
    failures: dict[str, str] = {}
    waiting: list[str] = []
    expired = request.expired(now)
    for site in request.sites:
        if store.exists(answer_key(request, site)):
            answers[site] = store.get_json(answer_key(request, site))
        elif store.exists(failure_key(request, site)):
            failures[site] = str(store.get_json(failure_key(request, site)).get("reason"))
        elif expired:
            failures[site] = f"no answer before the deadline {_iso(request.deadline)}"
        else:
            waiting.append(site)
    return answers, failures, waiting


def find_open_request(store: ModelStore, kind: str, request_id: str) -> SiteRequest:
    """The open request ``request_id`` of ``kind``; LookupError when there is none (closed or unknown)."""
    if kind not in KINDS:
        raise LookupError(f"no request kind {kind!r}; known: {KINDS}")
    key = _index_key(kind, request_id)
    if not store.exists(key):
        raise LookupError(f"no open {kind} request {request_id!r}")
    return load_request(store, store.get_json(key)["prefix"])
