"""``CentralClient``: what a site calls to talk to the central endpoint (:mod:`jipfed.central.app`).

Plain ``requests``, no Airflow import (the site's operators build it from the Connection
``jipfed_central_default``: host = base URL including the ``/jipfed`` prefix, password = the site
token). Importing this module is cheap; only :meth:`CentralClient.pending_work` imports the
protocol layer (and so torch) to build ``WorkItem`` objects — a trigger polling the central uses
:meth:`CentralClient.pending_work_dicts` instead.

GETs are retried on connection errors and 502/503/504 (3 tries, exponential backoff); uploads and
failure reports are not (a retried upload that did arrive is refused as ``duplicate``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import requests

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from jipfed.federation.dispatch import WorkItem

logger = logging.getLogger(__name__)

SHA256_HEADER = "X-Jipfed-Sha256"
SIGNATURE_HEADER = "X-Jipfed-Signature"
RETRY_STATUSES = frozenset({502, 503, 504})
_CHUNK_BYTES = 1024 * 1024


class CentralError(RuntimeError):
    """A call to the central failed.

    Attributes:
        status_code: the HTTP status, None when no answer came (connection error, timeout) or
            the answer was unusable (sha256 mismatch).
        code: the central's error code (``not_selected``, ``bad_token``, ...) when it sent one.
        detail: why, as the central said it.
        method, path, experiment, round: what was asked.
    """

    def __init__(
        self,
        status_code: int | None,
        detail: str,
        *,
        method: str = "",
        path: str = "",
        experiment: str | None = None,
        round: int | None = None,
        code: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.path = path
        self.experiment = experiment
        self.round = round
        self.code = code
        what = f"central {method} {path}".rstrip()
        if experiment is not None:
            what += f" (experiment {experiment!r}" + (f", round {round})" if round is not None else ")")
        outcome = (
            "failed" if status_code is None else f"answered {status_code}" + (f" {code}" if code else "")
        )
        super().__init__(f"{what} {outcome}: {detail}")


class CentralRefused(CentralError):
    """The central refused the request as not fitting the experiment's state (HTTP 409).

    ``code`` is the refusal code: ``late``, ``duplicate``, ``rejected``, ``wrong_round``,
    ``not_selected``, ``not_running`` (see ``UpdateRefused``) or ``not_open``.
    """

    def __init__(self, code: str, detail: str, **where: Any) -> None:
        super().__init__(409, detail, code=code, **where)


class OutgoingRefused(CentralRefused):
    """The client refused to send an update (``code="rejected"``, ``status_code`` None): it holds
    something besides the expected tensors and numeric fields (:mod:`jipfed.central.outgoing`)."""

    def __init__(self, detail: str, **where: Any) -> None:
        super().__init__("rejected", f"refused before sending: {detail}", **where)
        self.status_code = None


def _q(segment: str | int) -> str:
    return quote(str(segment), safe="")


def _error_of(response: requests.Response) -> tuple[str | None, str]:
    """(code, detail) of an error answer: our JSON body, FastAPI's validation list, or the text."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text[:500] or response.reason or "no detail"
    if isinstance(body, dict):
        code = body.get("code")
        return (str(code) if code is not None else None), str(body.get("detail", body))
    return None, str(body)


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(base_url: str) -> None:
    """ValueError unless ``base_url`` is https, or http to a loopback address (the token travels in it)."""
    parts = urlsplit(base_url) if isinstance(base_url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be https://host[:port]/prefix, got {base_url!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(
            f"refusing plain http to {parts.hostname!r}: the site token would travel in clear; use "
            "https:// (http is allowed only to localhost / 127.0.0.1 / ::1)"
        )


class CentralClient:
    """Client of one central endpoint, authenticated as one site.

    Args:
        base_url: The endpoint's base URL including its mount prefix, e.g.
            ``https://central.example/jipfed``.
        token: The site token (``jipfed site-token``); it decides which site the calls act as.
        timeout_s: Timeout of each HTTP request (connect and read), seconds.
        verify: TLS verification, as for ``requests`` (True, False or a CA bundle path).
        tries: Attempts of an idempotent call (GET) on connection errors and 502/503/504.
        backoff_s: Sleep before the second attempt; doubled before each further one.
        central_public_key: The central's Ed25519 public key (base64, from the central admin):
            every downloaded model must carry the central's signature of it (else CentralError).
        signing_key: The site's Ed25519 private key: uploads are signed with it (``put_update``
            then needs the plan ``step``).

    ``base_url`` must be https, except to a loopback address (the token travels in every request).
    Failure reasons are sanitised before they leave (:func:`jipfed.central.sanitize.sanitize_reason`).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 60,
        verify: bool | str = True,
        tries: int = 3,
        backoff_s: float = 1.0,
        central_public_key: str | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ) -> None:
        require_https(base_url)
        if not token:
            raise ValueError("a site token is required (from the central admin: jipfed site-token)")
        if timeout_s <= 0 or tries < 1 or backoff_s < 0:
            raise ValueError(
                f"need timeout_s > 0, tries >= 1, backoff_s >= 0; got {timeout_s}, {tries}, {backoff_s}"
            )
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.tries = tries
        self.backoff_s = backoff_s
        self.central_public_key = central_public_key
        parts = token.split(".")
        #: The site the token names (the central decides; this is for the outgoing check only).
        self.site = parts[1] if len(parts) >= 3 and parts[0].startswith("jipfed") else None
        self.signing_key = signing_key
        self._session = requests.Session()
        self._session.verify = verify
        self._session.headers["Authorization"] = f"Bearer {token}"

    def __repr__(self) -> str:  # never shows the token
        return f"CentralClient({self.base_url!r})"

    def _request(
        self,
        method: str,
        path: str,
        *,
        experiment: str | None = None,
        round: int | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        where = {"method": method, "path": path, "experiment": experiment, "round": round}
        attempts = self.tries if method == "GET" else 1
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= attempts
            try:
                response = self._session.request(
                    method, self.base_url + path, timeout=timeout_s or self.timeout_s, **kwargs
                )
            except requests.ConnectionError as exc:
                if last:
                    raise CentralError(None, f"no connection after {attempt} tries: {exc}", **where) from exc
                self._back_off(attempt, where, str(exc))
                continue
            except requests.RequestException as exc:
                raise CentralError(None, str(exc), **where) from exc
            if response.status_code in RETRY_STATUSES and not last:
                response.close()
                self._back_off(attempt, where, f"HTTP {response.status_code}")
                continue
            if response.status_code >= 400:
                code, detail = _error_of(response)
                if response.status_code == 409:
                    raise CentralRefused(code or "conflict", detail, **where)
                raise CentralError(response.status_code, detail, code=code, **where)
            return response

    def _back_off(self, attempt: int, where: dict[str, Any], why: str) -> None:
        delay = self.backoff_s * 2 ** (attempt - 1)
        logger.warning(
            "central %s %s: %s; try %d of %d in %.1f s",
            where["method"],
            where["path"],
            why,
            attempt + 1,
            self.tries,
            delay,
        )
        time.sleep(delay)

    # -- calls ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"status": "ok"}`` when the endpoint is up."""
        return self._request("GET", "/healthz").json()

    def pending_work_dicts(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """The site's pending work as JSON objects (``WorkItem.to_dict()``; no torch import).

        ``wait_s`` > 0: while there is none, the central answers once a step is dispatched or after
        ``wait_s`` (long poll, at most 25 s there; a central without it answers at once). The
        request's timeout is this client's ``timeout_s`` plus ``wait_s``.
        """
        params = {"wait_s": wait_s} if wait_s > 0 else None
        response = self._request(
            "GET", "/v1/work", params=params, timeout_s=self.timeout_s + max(wait_s, 0.0)
        )
        return list(response.json()["work"])

    def pending_work(self) -> list[WorkItem]:
        """Every dispatched step this site still has to answer, oldest first."""
        from jipfed.federation.dispatch import WorkItem

        return [WorkItem.from_dict(item) for item in self.pending_work_dicts()]

    def get_model(self, experiment: str, round: int, step: int) -> tuple[bytes, dict[str, Any]]:
        """(payload, manifest) of the model the site's ticket for ``step`` names.

        Raises:
            CentralError: also when the bytes do not match the ``X-Jipfed-Sha256`` header or the
                manifest's sha256 (a corrupted transfer; the call may be retried).
        """
        path = f"/v1/experiments/{_q(experiment)}/rounds/{_q(round)}/steps/{_q(step)}/model"
        where = {"experiment": experiment, "round": round}
        response = self._request("GET", path, stream=True, **where)
        digest = hashlib.sha256()
        chunks = []
        try:
            for chunk in response.iter_content(_CHUNK_BYTES):
                digest.update(chunk)
                chunks.append(chunk)
        except requests.RequestException as exc:
            raise CentralError(None, f"download broke off: {exc}", method="GET", path=path, **where) from exc
        payload, sha = b"".join(chunks), digest.hexdigest()
        manifest = self._request("GET", f"{path}/manifest", **where).json()
        for source, expected in (
            ("header " + SHA256_HEADER, response.headers.get(SHA256_HEADER)),
            ("manifest", manifest.get("sha256")),
        ):
            if expected != sha:
                raise CentralError(
                    None,
                    f"the model received has sha256 {sha}, the {source} says {expected}",
                    method="GET",
                    path=path,
                    **where,
                )
        if self.central_public_key is not None:
            self._verify_model(manifest, step, response.headers.get(SIGNATURE_HEADER), path, where)
        return payload, manifest

    def _verify_model(
        self, manifest: dict[str, Any], step: int, signature: str | None, path: str, where: dict[str, Any]
    ) -> None:
        from jipfed.federation.signing import SignatureInvalid, global_statement, load_public_key, verify

        try:
            key = load_public_key(str(self.central_public_key).encode("ascii"))
            verify(key, global_statement(manifest, step), signature, "the model received")
        except (SignatureInvalid, ValueError) as exc:
            code = getattr(exc, "code", "bad_signature")
            raise CentralError(
                None, f"{exc} (central's signature)", method="GET", path=path, code=code, **where
            ) from None

    def put_update(
        self,
        experiment: str,
        round: int,
        payload: bytes,
        manifest_json: str,
        *,
        step: int | None = None,
        check: bool = True,
    ) -> dict[str, Any]:
        """Upload the site's update for ``round``; returns the manifest the central accepted.

        With a ``signing_key`` the update is signed for plan step ``step`` (required then). First
        (``check``, on by default) :func:`jipfed.central.outgoing.check_outgoing_update` makes sure
        it holds only the expected tensors and numeric fields; ``check=False`` is for tests of
        the central's own defences.

        Raises:
            CentralRefused: late, duplicate, rejected (the codec's reason in ``detail``), unsigned, ...;
                :class:`OutgoingRefused` when the outgoing check refused it (nothing was sent).
        """
        path = f"/v1/experiments/{_q(experiment)}/rounds/{_q(round)}/update"
        if check:
            from jipfed.central.outgoing import OutgoingRejected, check_outgoing_update

            try:
                check_outgoing_update(payload, manifest_json, self.site)
            except OutgoingRejected as exc:
                raise OutgoingRefused(
                    str(exc), method="PUT", path=path, experiment=experiment, round=round
                ) from None
        fields = {"manifest": manifest_json}
        if self.signing_key is not None:
            fields["signature"] = self._sign_update(manifest_json, step)
        response = self._request(
            "PUT",
            path,
            experiment=experiment,
            round=round,
            data=fields,
            files={"payload": ("update.safetensors", payload, "application/octet-stream")},
        )
        return dict(response.json()["accepted"])

    def _sign_update(self, manifest_json: str, step: int | None) -> str:
        from jipfed.federation.signing import sign, update_statement

        if step is None:
            raise ValueError("a signed upload needs the plan step (put_update(..., step=ticket.step))")
        try:
            manifest = json.loads(manifest_json)
        except ValueError as exc:
            raise ValueError(f"the update manifest is not JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise ValueError("the update manifest is not a JSON object")
        return sign(self.signing_key, update_statement(manifest, manifest_json, step))  # type: ignore[arg-type]

    def report_cohort(self, experiment: str, round: int, step: int, n_cases: int) -> dict[str, Any]:
        """Tell the central how many cases this site trains on in ``step`` (call when taking the work).

        The update's ``n_samples`` may not exceed it; the first report of a round stays.
        """
        path = f"/v1/experiments/{_q(experiment)}/rounds/{_q(round)}/steps/{_q(step)}/cohort"
        response = self._request("POST", path, experiment=experiment, round=round, json={"n_cases": n_cases})
        return dict(response.json())

    def report_failure(
        self, experiment: str, round: int, step: int, reason: str, *, task: str | None = None
    ) -> dict[str, Any]:
        """Tell the central this site sends no update for ``step`` and why; returns the stored record.

        ``reason`` (an exception text, say) is sanitised here, before it leaves the site: what is
        sent is ``"<category> in <task>: <sanitised message>"`` (:mod:`jipfed.central.sanitize`).
        """
        from jipfed.central.sanitize import failure_report

        path = f"/v1/experiments/{_q(experiment)}/rounds/{_q(round)}/steps/{_q(step)}/failure"
        body = {"reason": failure_report(reason, task=task)}
        response = self._request("POST", path, experiment=experiment, round=round, json=body)
        return dict(response.json())

    # -- secure aggregation (jipfed.privacy.secagg_wire) -------------------------------------------

    def _secagg_path(self, experiment: str, round: int, step: int) -> str:
        return f"/v1/experiments/{_q(experiment)}/rounds/{_q(round)}/steps/{_q(step)}/secagg"

    def secagg_status(
        self, experiment: str, round: int, step: int, *, since: str | None = None, wait_s: float = 0.0
    ) -> dict[str, Any]:
        """The step's current secure-aggregation attempt (sites, keys once all posted, failed attempts);
        with ``since`` (a ``stage`` it returned) the central answers once the stage changed or after
        ``wait_s`` (long poll; keep ``wait_s`` below this client's ``timeout_s``)."""
        path = self._secagg_path(experiment, round, step)
        params = {} if since is None else {"since": since, "wait_s": wait_s}
        return dict(self._request("GET", path, experiment=experiment, round=round, params=params).json())

    def post_secagg_key(
        self, experiment: str, round: int, step: int, attempt: int, public_key: str
    ) -> dict[str, Any]:
        """Post this site's X25519 public key (base64) for ``attempt``; the same key again is accepted."""
        path = f"{self._secagg_path(experiment, round, step)}/{_q(attempt)}/key"
        body = {"public_key": public_key}
        return dict(self._request("POST", path, experiment=experiment, round=round, json=body).json())

    def put_masked_update(
        self, experiment: str, round: int, step: int, attempt: int, payload: bytes, manifest_json: str
    ) -> dict[str, Any]:
        """Upload this site's masked update for ``attempt`` (signed when the client has a key)."""
        from jipfed.federation.signing import sign, statement
        from jipfed.privacy.secagg_wire import MASKED_PURPOSE

        path = f"{self._secagg_path(experiment, round, step)}/{_q(attempt)}/masked"
        fields = {"manifest": manifest_json}
        if self.signing_key is not None:
            manifest = json.loads(manifest_json)
            claim = statement(
                MASKED_PURPOSE,
                experiment=experiment,
                round=round,
                step=step,
                site=str(manifest.get("site")),
                config_hash=str(manifest.get("config_hash")),
                manifest_text=manifest_json.encode("utf-8"),
                payload_sha256=manifest.get("sha256"),
            )
            fields["signature"] = sign(self.signing_key, claim)
        files = {"payload": ("masked.safetensors", payload, "application/octet-stream")}
        response = self._request("PUT", path, experiment=experiment, round=round, data=fields, files=files)
        return dict(response.json()["accepted"])

    # -- site requests (a line's census, federated evaluation) and released line models ------------

    def pending_requests(self) -> dict[str, list[dict[str, Any]]]:
        """Open census / evaluation requests this site has not answered: ``{kind: [request dict]}``."""
        return dict(self._request("GET", "/v1/requests").json())

    def answer_request(self, kind: str, request_id: str, numbers: dict[str, Any]) -> None:
        """Answer a request with a JSON object of finite numbers (nothing identifying leaves the site)."""
        self._request("POST", f"/v1/requests/{_q(kind)}/{_q(request_id)}/answer", json=numbers)

    def report_request_failure(self, kind: str, request_id: str, reason: str) -> None:
        """Tell the central this site cannot answer a request, and why (sanitised before it leaves)."""
        from jipfed.central.sanitize import failure_report

        body = {"reason": failure_report(reason, task=kind)}
        self._request("POST", f"/v1/requests/{_q(kind)}/{_q(request_id)}/failure", json=body)

    def get_evaluation_model(self, request_id: str, label: str) -> tuple[bytes, dict[str, Any]]:
        """(payload, manifest) of a model an evaluation request asks this site to score.

        The caller checks the sha256 the request names (:func:`jipfed.federation.evaluation.decode_model`).
        """
        path = f"/v1/requests/evaluate/{_q(request_id)}/models/{_q(label)}"
        payload = self._request("GET", path).content
        return payload, dict(self._request("GET", f"{path}/manifest").json())

    def get_released_model(self, line: str) -> tuple[str, bytes]:
        """(version, payload) of ``line``'s released model (never a rejected candidate); sha256 checked."""
        response = self._request("GET", f"/v1/lines/{_q(line)}/released")
        if hashlib.sha256(response.content).hexdigest() != response.headers.get(SHA256_HEADER):
            raise CentralError(
                None,
                f"line {line!r}: released model does not match its sha256",
                method="GET",
                path=f"/v1/lines/{line}/released",
            )
        return response.headers.get("X-Jipfed-Version", ""), response.content
