"""The central endpoint sites talk to: an authenticated HTTP layer over :mod:`jipfed.federation.dispatch`.

Sites open outbound connections only: they ask for their work, report their cohort, download the
model their ticket names, upload their update or report a failure. Every ``/v1`` route needs
``Authorization: Bearer <site token>``, checked against the credential registry
(:mod:`jipfed.central.credentials`); the site a request acts as comes from the token only. Routes
(relative to where the app is mounted, ``/jipfed`` in the Airflow plugin)::

    GET  /healthz                                                     no auth
    GET  /v1/work                                                     the site's pending work (its own view;
                                                                      ?wait_s=: long poll)
    GET  /v1/experiments/{exp}/rounds/{r}/steps/{s}/model             payload (X-Jipfed-Sha256, X-Jipfed-Signature)
    GET  /v1/experiments/{exp}/rounds/{r}/steps/{s}/model/manifest    its manifest
    POST /v1/experiments/{exp}/rounds/{r}/steps/{s}/cohort            {"n_cases": N}
    PUT  /v1/experiments/{exp}/rounds/{r}/update                      multipart: manifest + payload (+ signature)
    POST /v1/experiments/{exp}/rounds/{r}/steps/{s}/failure           {"reason": "..."}
    GET  /v1/central-key                                              the central's Ed25519 public key
    GET  /v1/requests                                                 open census / evaluation requests for the site
    POST /v1/requests/{kind}/{id}/answer                              JSON object of numbers only
    POST /v1/requests/{kind}/{id}/failure                             {"reason": "..."}
    GET  /v1/requests/evaluate/{id}/models/{label}                    a model to score (X-Jipfed-Sha256)
    GET  /v1/requests/evaluate/{id}/models/{label}/manifest           its manifest
    GET  /v1/lines/{line}/released                                    the line's released model (X-Jipfed-Version)
    GET  /v1/experiments/{exp}/rounds/{r}/steps/{s}/secagg            secure aggregation: the current attempt
                                                                      (?since=<stage>&wait_s=: long poll)
    POST /v1/experiments/{exp}/rounds/{r}/steps/{s}/secagg/{a}/key    {"public_key": base64 X25519}
    PUT  /v1/experiments/{exp}/rounds/{r}/steps/{s}/secagg/{a}/masked multipart: manifest + payload (+ signature)

Errors are JSON ``{"code": ..., "detail": ...}`` (see ``docs/central-api.md``): 400 bad_request,
401 no_token, 403 bad_token / expired_token / revoked_token / rotated_token / not_selected, 404
unknown_experiment, 409 not_open or an ``UpdateRefused`` code (late, duplicate, rejected,
unsigned, bad_signature, ...), 413 too_large, 500 internal / misconfigured (no traceback; the log
has it). Uploads, reports and downloads are appended to the audit log (:mod:`jipfed.central.audit`).
No Airflow import: the Airflow plugin (``jipfed.plugins.jipfed_plugin``) mounts this app.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field

from jipfed.central.audit import record_event
from jipfed.central.credentials import CredentialRefused, authenticate
from jipfed.central.model_signing import central_public_key, signed_model
from jipfed.central.sanitize import sanitize_text
from jipfed.central.tokens import InvalidToken, check_secret
from jipfed.central.uploads import (
    DEFAULT_SIZE_FACTOR,
    MalformedUpload,
    UploadPermit,
    UploadTooLarge,
    authorise_upload,
    commit_upload,
    read_upload,
)
from jipfed.federation.dispatch import (
    MAX_COHORT_CASES,
    Dispatch,
    current_dispatch,
    model_for_site,
    report_cohort,
    report_site_failure,
    wait_for_work,
)
from jipfed.federation.rounds import ProtocolError, UpdateRefused
from jipfed.storage.base import ModelStore, StoreError
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPDATE_BYTES = 2 * 1024**3
#: Longest failure reason accepted (the store keeps the last ``dispatch.MAX_REASON_CHARS``).
MAX_REASON_CHARS = 100_000
#: Longest failure reason stored after sanitising (category, task and message).
MAX_REPORT_CHARS = 400
SHA256_HEADER = "X-Jipfed-Sha256"
SIGNATURE_HEADER = "X-Jipfed-Signature"

SecretSource = str | Callable[[], str]


class CentralAPIError(Exception):
    """An error answer: ``status`` with JSON ``{"code": code, "detail": detail}``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers


@dataclass(frozen=True)
class _Call:
    """Who asks about what: names the request in error details and logs."""

    site: str
    experiment: str | None = None
    round: int | None = None
    step: int | None = None

    def where(self) -> str:
        parts = [f"experiment {self.experiment!r}"] if self.experiment else []
        parts += [
            f"{name} {value}"
            for name, value in (("round", self.round), ("step", self.step))
            if value is not None
        ]
        return ", ".join(parts + [f"site {self.site!r}"])


class CohortReport(BaseModel):
    """Body of a cohort report: how many cases the site trains on in this step."""

    n_cases: int = Field(ge=0, le=MAX_COHORT_CASES, strict=True)


class FailureReport(BaseModel):
    """Body of a failure report."""

    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)


@contextmanager
def _protocol_errors(call: _Call) -> Iterator[None]:
    """Map the protocol's and the store's exceptions to answers naming the request."""
    try:
        yield
    except CentralAPIError:
        raise
    except UpdateRefused as exc:
        raise CentralAPIError(409, exc.code, exc.reason) from None
    except ProtocolError as exc:
        raise CentralAPIError(409, "not_open", f"{call.where()}: {exc}") from None
    except Exception as exc:  # a store or integrity failure: the client learns what failed, not how
        logger.exception("central: %s failed", call.where())
        raise CentralAPIError(
            500,
            "internal",
            f"{call.where()}: the central failed ({type(exc).__name__}); see the central's log",
        ) from None


def _experiment_store(store: ModelStore, call: _Call) -> ExperimentStore:
    """The experiment's store; 400 for an invalid name, 404 when it has no state."""
    try:
        exp_store = ExperimentStore(store, str(call.experiment))
    except ValueError as exc:
        raise CentralAPIError(400, "bad_request", str(exc)) from None
    if not store.exists(exp_store.layout.state()):
        raise CentralAPIError(404, "unknown_experiment", f"no experiment {call.experiment!r} at this central")
    return exp_store


def _selected_dispatch(exp_store: ExperimentStore, call: _Call) -> Dispatch:
    """The open dispatch of ``call``'s step; 409 when that step is not open, 403 when it does not select the site."""
    dispatch = current_dispatch(exp_store)
    if dispatch is None or (dispatch.ticket.round, dispatch.ticket.step) != (call.round, call.step):
        now_open = (
            "no step is open"
            if dispatch is None
            else f"the open step is {dispatch.ticket.step} (round {dispatch.ticket.round})"
        )
        raise CentralAPIError(409, "not_open", f"{call.where()}: this step is not open; {now_open}")
    if call.site not in dispatch.ticket.sites:
        raise CentralAPIError(403, "not_selected", f"{call.where()}: the site is not selected for this step")
    return dispatch


def _secret_of(source: SecretSource) -> str:
    try:
        return check_secret(source() if callable(source) else source)
    except Exception as exc:
        logger.error("central misconfigured: no usable site token secret: %s", exc)
        raise CentralAPIError(
            500, "misconfigured", "the central has no usable site token secret; see the central's log"
        ) from None


_bearer = HTTPBearer(auto_error=False, description="the site token from `jipfed site-token`")


def authenticated_site(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The site of the request's bearer token, checked against the credential registry.

    401 without a token; 403 ``bad_token`` (malformed, HMAC mismatch), ``expired_token``,
    ``revoked_token`` or ``rotated_token``.
    """
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise CentralAPIError(
            401, "no_token", "missing site token: send 'Authorization: Bearer <site token>'", challenge
        )
    secret = _secret_of(request.app.state.token_secret)
    store = request.app.state.open_store(_Call("-"))
    try:
        claims = authenticate(store, secret, credentials.credentials)
    except CredentialRefused as exc:
        raise CentralAPIError(403, exc.code, str(exc), challenge) from None
    except InvalidToken as exc:
        raise CentralAPIError(403, "bad_token", str(exc), challenge) from None
    except StoreError:
        logger.exception("central: cannot read the credential registry")
        raise CentralAPIError(500, "internal", "the central cannot read its credential registry") from None
    request.state.site = claims.site
    request.state.key_id = claims.key_id
    return claims.site


Site = Annotated[str, Depends(authenticated_site)]

#: (method, endpoint function) of the requests recorded in the audit log, and their action name.
_AUDITED = {
    ("PUT", "update"): "update",
    ("POST", "failure"): "failure_report",
    ("POST", "cohort"): "cohort_report",
    ("GET", "model"): "model",
    ("POST", "secagg_key"): "secagg_key",
    ("PUT", "secagg_masked"): "masked_update",
}


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else None


def _route_name(request: Request) -> str | None:
    endpoint = request.scope.get("endpoint")
    return getattr(endpoint, "__name__", None)


Round = Annotated[int, Path(ge=0, description="round number")]
Step = Annotated[int, Path(ge=0, description="plan step number")]


def create_app(
    store_factory: Callable[[], ModelStore],
    token_secret: SecretSource,
    *,
    max_update_bytes: int = DEFAULT_MAX_UPDATE_BYTES,
    upload_size_factor: float = DEFAULT_SIZE_FACTOR,
) -> FastAPI:
    """The central endpoint as a FastAPI app.

    Args:
        store_factory: Opens the model store; called once per request (the Airflow plugin reads
            its Connection there, so a changed Connection applies without a restart).
        token_secret: The secret site tokens are derived from (>= 32 characters), or a callable
            returning it per request. A string is checked here, a callable on each request.
        max_update_bytes: Largest update payload accepted (413 beyond), whatever the model's size.
        upload_size_factor: An update payload may be this many times the byte size of the step's
            start model (plus header room); 413 beyond.
    """
    if not callable(token_secret):
        check_secret(token_secret)
    if isinstance(max_update_bytes, bool) or not isinstance(max_update_bytes, int) or max_update_bytes < 1:
        raise ValueError(f"max_update_bytes must be an int >= 1, got {max_update_bytes!r}")

    app = FastAPI(
        title="JIP Federated central endpoint",
        description=__doc__,
        version="1",
        docs_url=None,
        redoc_url=None,
    )
    app.state.token_secret = token_secret

    def open_store(call: _Call) -> ModelStore:
        try:
            return store_factory()
        except Exception:
            logger.exception("central misconfigured: cannot open the model store (%s)", call.where())
            raise CentralAPIError(
                500, "misconfigured", "the central cannot open its model store; see the central's log"
            ) from None

    app.state.open_store = open_store

    @app.exception_handler(CentralAPIError)
    async def api_error(request: Request, exc: CentralAPIError) -> JSONResponse:
        request.state.detail = exc.detail
        request.state.code = exc.code
        return JSONResponse({"code": exc.code, "detail": exc.detail}, exc.status, headers=exc.headers)

    @app.middleware("http")
    async def log_outcome(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.monotonic()
        response = await call_next(request)
        params: dict[str, Any] = request.scope.get("path_params") or {}
        state: dict[str, Any] = request.scope.get("state") or {}
        status = response.status_code
        level = logging.ERROR if status >= 500 else logging.WARNING if status >= 400 else logging.INFO
        logger.log(
            level,
            "central: %s %s -> %d site=%s experiment=%s round=%s step=%s (%.0f ms)%s",
            request.method,
            request.url.path,
            status,
            state.get("site", "-"),
            params.get("experiment", "-"),
            params.get("round_", "-"),
            params.get("step", "-"),
            1000 * (time.monotonic() - started),
            f": {state['detail']}" if "detail" in state else "",
        )
        action = _AUDITED.get((request.method, _route_name(request)))
        if action is not None and "site" in state:
            await run_in_threadpool(_audit, request, action, status, params, state)
        return response

    def _audit(
        request: Request, action: str, status: int, params: dict[str, Any], state: dict[str, Any]
    ) -> None:
        try:
            store = open_store(_Call(state["site"]))
        except CentralAPIError:
            return
        record_event(
            store,
            state["site"],
            action,
            "accepted" if status < 400 else str(state.get("code", status)),
            key_id=state.get("key_id"),
            experiment=params.get("experiment"),
            round=_int_or_none(params.get("round_")),
            step=_int_or_none(params.get("step")),
            **state.get("audit", {}),
        )

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness; no authentication, touches no store."""
        return {"status": "ok"}

    @app.get("/v1/work")
    async def work(site: Site, wait_s: Annotated[float, Query(ge=0)] = 0.0) -> dict[str, Any]:
        """Every dispatched step, across running experiments, the site still has to answer.
        ``wait_s`` (long poll, at most ``dispatch.MAX_WORK_WAIT_S``): while there is none, answer
        once a step is dispatched or ``wait_s`` passed; 0 (old clients) answers at once."""
        call = _Call(site)
        with _protocol_errors(call):
            store = await run_in_threadpool(open_store, call)
            items = await wait_for_work(store, site, wait_s, run_in_threadpool)
        return {"site": site, "work": [item.to_dict() for item in items]}

    @app.get("/v1/experiments/{experiment}/rounds/{round_}/steps/{step}/model")
    def model(request: Request, experiment: str, round_: Round, step: Step, site: Site) -> Response:
        """The payload of the model the site's ticket names; headers X-Jipfed-Sha256, X-Jipfed-Signature."""
        call = _Call(site, experiment, round_, step)
        with _protocol_errors(call):
            exp_store = _experiment_store(open_store(call), call)
            ticket = _selected_dispatch(exp_store, call).ticket
            payload, manifest = model_for_site(exp_store, site, round_, step)
            signature = signed_model(
                exp_store.store, _secret_of(request.app.state.token_secret), ticket.model_key, manifest, step
            )
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={SHA256_HEADER: hashlib.sha256(payload).hexdigest(), SIGNATURE_HEADER: signature},
        )

    @app.get("/v1/central-key")
    def central_key(request: Request, site: Site) -> dict[str, str]:
        """The central's Ed25519 public key (base64); sites pin the value the admin handed them."""
        return {"ed25519": central_public_key(_secret_of(request.app.state.token_secret))}

    @app.get("/v1/experiments/{experiment}/rounds/{round_}/steps/{step}/model/manifest")
    def model_manifest(experiment: str, round_: Round, step: Step, site: Site) -> dict[str, Any]:
        """The manifest of the model the site's ticket names."""
        call = _Call(site, experiment, round_, step)
        with _protocol_errors(call):
            exp_store = _experiment_store(open_store(call), call)
            ticket = _selected_dispatch(exp_store, call).ticket
            return exp_store.store.get_json(ticket.manifest_key)

    @app.put("/v1/experiments/{experiment}/rounds/{round_}/update", status_code=201)
    async def update(request: Request, experiment: str, round_: Round, site: Site) -> JSONResponse:
        """Accept the site's update (multipart: text ``manifest``, file ``payload``) before the deadline.

        Authorised before the body is read; the body is streamed to a spooled file within a limit
        derived from the step's model size, stored, validated from the store and committed by
        writing its manifest last (:mod:`jipfed.central.uploads`).
        """
        call = _Call(site, experiment, round_)

        def authorise() -> tuple[ExperimentStore, UploadPermit]:
            with _protocol_errors(call):
                exp_store = _experiment_store(open_store(call), call)
                return exp_store, authorise_upload(
                    exp_store, site, round_, upload_size_factor, max_update_bytes
                )

        exp_store, permit = await run_in_threadpool(authorise)
        limits = permit.limits
        try:
            upload = await read_upload(request, limits, extra_fields=("signature",))
        except UploadTooLarge:
            raise CentralAPIError(
                413,
                "too_large",
                f"{call.where()}: the update exceeds this step's limit of {limits.payload_bytes} bytes "
                "(derived from the model's size)",
            ) from None
        except MalformedUpload as exc:
            raise CentralAPIError(400, "bad_request", f"{call.where()}: {exc}") from None

        def accept() -> dict[str, Any]:
            with _protocol_errors(call):
                return commit_upload(exp_store, site, round_, upload, permit).to_dict()

        try:
            accepted = await run_in_threadpool(accept)
        finally:
            await upload.close()
        request.state.audit = {"sha256": accepted["sha256"], "n_samples": accepted["n_samples"]}
        return JSONResponse({"accepted": accepted}, status_code=201)

    @app.post("/v1/experiments/{experiment}/rounds/{round_}/steps/{step}/cohort", status_code=201)
    def cohort(experiment: str, round_: Round, step: Step, report: CohortReport, site: Site) -> JSONResponse:
        """Record the cohort size the site takes this step's work with (bounds its update's n_samples)."""
        call = _Call(site, experiment, round_, step)
        with _protocol_errors(call):
            exp_store = _experiment_store(open_store(call), call)
            _selected_dispatch(exp_store, call)
            record = report_cohort(exp_store, site, round_, step, report.n_cases)
        return JSONResponse(record, status_code=201)

    @app.post("/v1/experiments/{experiment}/rounds/{round_}/steps/{step}/failure", status_code=201)
    def failure(
        experiment: str, round_: Round, step: Step, report: FailureReport, site: Site
    ) -> JSONResponse:
        """Record that the site sends no update for this step, and why."""
        call = _Call(site, experiment, round_, step)
        with _protocol_errors(call):
            exp_store = _experiment_store(open_store(call), call)
            _selected_dispatch(exp_store, call)
            reason = sanitize_text(report.reason, MAX_REPORT_CHARS)  # again: a site may not use our client
            record = report_site_failure(exp_store, site, round_, step, reason)
        return JSONResponse(record, status_code=201)

    _add_request_routes(app, open_store)
    _add_secagg_routes(app, open_store)
    return app


def _add_request_routes(app: FastAPI, open_store: Callable[[_Call], ModelStore]) -> None:
    """Routes of the site requests (a line's census, federated evaluation) and released line models."""
    from jipfed.federation import evaluation, site_requests
    from jipfed.lines.store import LineStore

    def open_request(site: str, kind: str, request_id: str) -> tuple[ModelStore, site_requests.SiteRequest]:
        store = open_store(_Call(site))
        try:
            request = site_requests.find_open_request(store, kind, request_id)
        except LookupError as exc:
            raise CentralAPIError(404, "unknown_request", str(exc)) from None
        if site not in request.sites:
            raise CentralAPIError(
                403, "not_selected", f"{kind} request {request_id!r}: site {site!r} is not asked"
            )
        return store, request

    @app.get("/v1/requests")
    def requests_for_site(site: Site) -> dict[str, Any]:
        """The open census and evaluation requests the site has not answered."""
        with _protocol_errors(_Call(site)):
            store = open_store(_Call(site))
            return {
                kind: [r.to_dict() for r in site_requests.pending_requests(store, site, kind)]
                for kind in site_requests.KINDS
            }

    @app.post("/v1/requests/{kind}/{request_id}/answer", status_code=201)
    def answer_request(kind: str, request_id: str, numbers: dict[str, Any], site: Site) -> JSONResponse:
        """Record the site's answer: a JSON object of finite numbers (nested objects allowed)."""
        store, request = open_request(site, kind, request_id)
        try:
            site_requests.answer(store, request, site, numbers)
        except ValueError as exc:
            raise CentralAPIError(400, "bad_request", str(exc)) from None
        except PermissionError as exc:
            raise CentralAPIError(409, "refused", str(exc)) from None
        return JSONResponse({"request": request_id, "site": site}, status_code=201)

    @app.post("/v1/requests/{kind}/{request_id}/failure", status_code=201)
    def request_failure(kind: str, request_id: str, report: FailureReport, site: Site) -> JSONResponse:
        """Record that the site cannot answer the request, and why."""
        store, request = open_request(site, kind, request_id)
        site_requests.fail(store, request, site, sanitize_text(report.reason, MAX_REPORT_CHARS))
        return JSONResponse({"request": request_id, "site": site}, status_code=201)

    @app.get("/v1/requests/evaluate/{request_id}/models/{label}")
    def evaluation_model(request_id: str, label: str, site: Site) -> Response:
        """The payload of one model the evaluation asks the site to score."""
        store, request = open_request(site, "evaluate", request_id)
        try:
            payload, _ = evaluation.model_for_evaluation(store, request, label, site)
        except KeyError as exc:
            raise CentralAPIError(404, "unknown_model", str(exc)) from None
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={SHA256_HEADER: hashlib.sha256(payload).hexdigest()},
        )

    @app.get("/v1/requests/evaluate/{request_id}/models/{label}/manifest")
    def evaluation_manifest(request_id: str, label: str, site: Site) -> dict[str, Any]:
        """The manifest of one model the evaluation asks the site to score."""
        store, request = open_request(site, "evaluate", request_id)
        try:
            return evaluation.model_for_evaluation(store, request, label, site)[1]
        except KeyError as exc:
            raise CentralAPIError(404, "unknown_model", str(exc)) from None

    @app.get("/v1/lines/{line}/released")
    def released_model(line: str, site: Site) -> Response:
        """The released model of ``line`` (never a rejected candidate), for a site of the line."""
        call = _Call(site)
        try:
            lines = LineStore(open_store(call), line)
            if site not in lines.load().sites:
                raise CentralAPIError(
                    403, "not_selected", f"line {line!r}: site {site!r} is not one of its sites"
                )
            version, payload, manifest = lines.released_model()
        except (KeyError, ValueError) as exc:
            raise CentralAPIError(404, "not_released", str(exc)) from None
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={SHA256_HEADER: manifest["sha256"], "X-Jipfed-Version": version},
        )


class PublicKeyPost(BaseModel):
    """Body of a secure-aggregation key post: the site's X25519 public key for the attempt."""

    public_key: str = Field(min_length=1, max_length=100)


def _add_secagg_routes(app: FastAPI, open_store: Callable[[_Call], ModelStore]) -> None:
    """Secure aggregation over the wire (:mod:`jipfed.privacy.secagg_wire`, ``docs/protocol.md``)."""
    from jipfed.central.credentials import load_credential
    from jipfed.central.uploads import HEADER_BYTES, UploadLimits
    from jipfed.federation.update import UpdateManifest
    from jipfed.privacy import secagg_wire

    prefix = "/v1/experiments/{experiment}/rounds/{round_}/steps/{step}/secagg"

    @app.get(prefix)
    async def secagg_status(
        experiment: str,
        round_: Round,
        step: Step,
        site: Site,
        since: Annotated[str | None, Query(max_length=100)] = None,
        wait_s: Annotated[float, Query(ge=0)] = 0.0,  # at most secagg_wire.MAX_WAIT_S
    ) -> dict[str, Any]:
        """The current secure-aggregation attempt: its sites, who posted keys / masked updates, the
        public keys once every site of the attempt posted one, the failed attempts and why.
        ``since`` + ``wait_s``: answer once the attempt's ``stage`` differs from ``since`` (long poll)."""
        call = _Call(site, experiment, round_, step)

        def status() -> dict[str, Any]:
            with _protocol_errors(call):
                exp_store = _experiment_store(open_store(call), call)
                return secagg_wire.attempt_status(exp_store, site, round_, step)

        return await secagg_wire.wait_for_change(lambda: run_in_threadpool(status), since, wait_s)

    @app.post(prefix + "/{attempt}/key", status_code=201)
    def secagg_key(
        experiment: str,
        round_: Round,
        step: Step,
        attempt: Annotated[int, Path(ge=0)],
        body: PublicKeyPost,
        site: Site,
    ) -> JSONResponse:
        """Store the site's public key for the attempt (write-once; another key is refused: key_exists)."""
        call = _Call(site, experiment, round_, step)
        with _protocol_errors(call):
            exp_store = _experiment_store(open_store(call), call)
            try:
                record = secagg_wire.post_key(exp_store, site, round_, step, attempt, body.public_key)
            except ValueError as exc:
                raise CentralAPIError(400, "bad_request", f"{call.where()}: {exc}") from None
        return JSONResponse(record, status_code=201)

    @app.put(prefix + "/{attempt}/masked", status_code=201)
    async def secagg_masked(
        request: Request,
        experiment: str,
        round_: Round,
        step: Step,
        attempt: Annotated[int, Path(ge=0)],
        site: Site,
    ) -> JSONResponse:
        """Accept the site's masked update (multipart: text ``manifest``, file ``payload``, ``signature``)."""
        call = _Call(site, experiment, round_, step)

        def authorise() -> tuple[ExperimentStore, UploadLimits, bytes | None]:
            with _protocol_errors(call):
                exp_store = _experiment_store(open_store(call), call)
                dispatch, _ = secagg_wire.open_for_site(exp_store, site, round_, step)
                start = UpdateManifest.from_dict(exp_store.store.get_json(dispatch.ticket.manifest_key))
                length = secagg_wire.vector_length(start)
                credential = load_credential(exp_store.store, site)
                key = credential.public_key_bytes() if credential else None
                return exp_store, UploadLimits(8 * length + HEADER_BYTES, HEADER_BYTES), key

        exp_store, limits, signing_key = await run_in_threadpool(authorise)
        try:
            upload = await read_upload(request, limits, extra_fields=("signature",))
        except UploadTooLarge:
            raise CentralAPIError(
                413, "too_large", f"{call.where()}: the masked update exceeds {limits.payload_bytes} bytes"
            ) from None
        except MalformedUpload as exc:
            raise CentralAPIError(400, "bad_request", f"{call.where()}: {exc}") from None

        def accept() -> dict[str, Any]:
            with _protocol_errors(call):
                return secagg_wire.commit_masked(
                    exp_store,
                    site,
                    round_,
                    step,
                    attempt,
                    upload.manifest,
                    upload.payload.read(),
                    signing_key=signing_key,
                    signature=upload.fields.get("signature"),
                )

        try:
            accepted = await run_in_threadpool(accept)
        finally:
            await upload.close()
        request.state.audit = {"sha256": accepted["sha256"], "attempt": attempt}
        return JSONResponse({"accepted": accepted}, status_code=201)
