"""The JIP Federated Airflow plugin: the central endpoint and the experiment pages in the API server.

On Airflow 3 the plugin mounts one FastAPI app at ``/jipfed`` of the central's API server:

* ``/jipfed/healthz`` and ``/jipfed/v1/...``: the endpoint sites talk to
  (:mod:`jipfed.central.app`). Airflow serves plugin apps without its own authentication; the
  site tokens are the gate (sites are not Airflow users).
* ``/jipfed/ui/...``: experiment pages for Airflow users (:mod:`jipfed.central.ui`), read-only,
  behind Airflow's authentication (the UI session cookie or a JWT). A nav entry "Federated
  experiments" shows them inside the Airflow UI, and a "Federated experiment" tab on each DAG run
  opens the experiment of a central run (``/jipfed/ui/runs/{DAG_ID}/{RUN_ID}``). The model lines'
  pages (:mod:`jipfed.lines.page`) are at ``/jipfed/ui/lines/`` ("Model lines"), same auth.

On Airflow 2.11 the same pages are a Flask AppBuilder view at ``/jipfed/...`` with a "Federated
experiments" entry under Browse (:mod:`jipfed.plugins.jipfed_af2_view`), behind Airflow's login;
the site endpoint is not served there.

Settings, read on each request (so a changed Connection or secret needs no restart):

* the model store: the Connection ``[jipfed] model_store_conn_id`` (env
  ``AIRFLOW__JIPFED__MODEL_STORE_CONN_ID``, default ``jipfed_model_store_default``; conn_type
  ``aws`` or ``fs``, see :class:`jipfed.operators.hooks.ModelStoreHook`). The API server reads it
  through the secrets backends including the metadata DB.
* the site token secret: ``[jipfed] site_token_secret`` (env ``AIRFLOW__JIPFED__SITE_TOKEN_SECRET``).

The app is built on the first request: every Airflow process loads plugins, and only the API
server needs the endpoint (and its torch import).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from jipfed.operators.compat import AIRFLOW_V3

URL_PREFIX = "/jipfed"
CONFIG_SECTION = "jipfed"
DEFAULT_MODEL_STORE_CONN_ID = "jipfed_model_store_default"
UI_PREFIX = f"{URL_PREFIX}/ui"
CENTRAL_DAG_ID = "jipfed_central"
#: Candidate run ids of an experiment's steps; :func:`experiment_of_run` checks them against
#: ``jipfed.operators.central.chain.next_run_id`` (the one place that names them).
STEP_RUN_ID = re.compile(r"jipfed__(?P<experiment>.+)__step(?P<step>[0-9]+)")


def model_store_conn_id() -> str:
    """``[jipfed] model_store_conn_id``, default ``jipfed_model_store_default``."""
    from airflow.configuration import conf

    return conf.get(CONFIG_SECTION, "model_store_conn_id", fallback=DEFAULT_MODEL_STORE_CONN_ID)


def open_model_store() -> Any:
    """The model store named by the Connection (read now, through Airflow's secrets backends)."""
    from jipfed.operators.hooks.model_store_hook import ModelStoreHook, store_config

    from jipfed.storage.factory import open_store

    return open_store(**store_config(ModelStoreHook.get_connection(model_store_conn_id())))


def site_token_secret() -> str:
    """``[jipfed] site_token_secret`` ("" when unset; the endpoint then answers 500 misconfigured)."""
    from airflow.configuration import conf

    return conf.get(CONFIG_SECTION, "site_token_secret", fallback="") or ""


def experiment_of_run(dag_id: str, run_id: str) -> str | None:
    """The experiment a central DAG run works on (None: another DAG, or a run not started by a step)."""
    from jipfed.operators.central.chain import next_run_id

    match = STEP_RUN_ID.fullmatch(run_id) if dag_id == CENTRAL_DAG_ID else None
    if match is None or next_run_id(match["experiment"], int(match["step"])) != run_id:
        return None
    return match["experiment"]


def ui_links(base: str, dag_run_href: Callable[[str], str]) -> Any:
    """Where the pages live (``base``) and how a central run's Airflow page is addressed."""
    from jipfed.operators.central.chain import next_run_id

    from jipfed.central.ui_html import Links

    return Links(base=base, dag_run=lambda experiment, step: dag_run_href(next_run_id(experiment, step)))


def build_app() -> Any:
    """The central endpoint with the experiment pages under ``/ui`` (Airflow auth)."""
    from urllib.parse import quote

    from airflow.api_fastapi.core_api.security import requires_authenticated
    from fastapi import Depends

    from jipfed.central.app import create_app
    from jipfed.central.ui import ui_router
    from jipfed.lines.page import lines_router

    app = create_app(open_model_store, site_token_secret)
    links = ui_links(UI_PREFIX, lambda run_id: f"/dags/{CENTRAL_DAG_ID}/runs/{quote(run_id)}")
    signed_in = [Depends(requires_authenticated())]
    app.include_router(
        ui_router(open_model_store, links=links, experiment_of_run=experiment_of_run, dependencies=signed_in),
        prefix="/ui",
        include_in_schema=False,
    )
    app.include_router(
        lines_router(open_model_store, dependencies=signed_in), prefix="/ui/lines", include_in_schema=False
    )
    return app


class LazyASGIApp:
    """An ASGI app that builds the real one (in a worker thread) on its first call."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build = build
        self._app: Any = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"LazyASGIApp({self._build.__module__}.{self._build.__qualname__})"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            async with self._lock:
                if self._app is None:
                    self._app = await asyncio.to_thread(self._build)
        await self._app(scope, receive, send)


class JipfedPlugin(AirflowPlugin):
    """The central endpoint and the experiment pages (Airflow 3); the pages only (Airflow 2.11)."""

    name = "jipfed"
    if AIRFLOW_V3:
        fastapi_apps = [{"app": LazyASGIApp(build_app), "url_prefix": URL_PREFIX, "name": "JIP Federated"}]
        external_views = [
            {
                "name": "Federated experiments",
                "href": f"{UI_PREFIX}/experiments",
                "url_route": "jipfed-experiments",
                "destination": "nav",
                "category": "browse",
            },
            {
                "name": "Model lines",
                "href": f"{UI_PREFIX}/lines/",
                "url_route": "jipfed-lines",
                "destination": "nav",
                "category": "browse",
            },
            {
                "name": "Federated experiment",
                "href": f"{UI_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}",
                "url_route": "jipfed-run",
                "destination": "dag_run",
            },
        ]
    else:
        from jipfed.plugins.jipfed_af2_view import appbuilder_view

        appbuilder_views = [appbuilder_view()]
