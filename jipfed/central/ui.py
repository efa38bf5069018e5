"""Experiment pages for people (FastAPI): the Airflow 3 plugin mounts them under ``/jipfed/ui``.

``ui_router(store_factory, links=..., dependencies=[...])`` returns the routes; the plugin passes
Airflow's own authentication as ``dependencies`` (this module has no Airflow import)::

    GET /experiments                                   every experiment: status, progress; compare form
    GET /experiments/{exp}                             progress, participation grid, charts, rounds,
                                                       final model (reloads itself while running)
    GET /experiments/{exp}/report.html                 the self-contained HTML report, built now
    GET /experiments/{exp}/final/report.html           the report stored with the final model
    GET /experiments/{exp}/rounds/{r}/failures/{site}  a site's failure report
    GET /compare?e=<exp>&e=<exp>...                    curves overlaid, settings side by side
    GET /runs/{dag_id}/{run_id}                        a central DAG run -> its experiment's page
    GET /static/{file}                                 uPlot and the chart script (vendored)

Every route is a GET: the pages are read-only. Everything is read from the model store per request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.params import Depends
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from jipfed.central import ui_pages
from jipfed.central.ui_html import Links, Page, e
from jipfed.storage.base import ModelStore

RunResolver = Callable[[str, str], str | None]


def ui_router(
    store_factory: Callable[[], ModelStore],
    *,
    links: Links | None = None,
    experiment_of_run: RunResolver = lambda dag_id, run_id: None,
    dependencies: Sequence[Depends] = (),
) -> APIRouter:
    """The experiment pages; ``dependencies`` guard every route (the plugin passes Airflow's auth).

    ``links.base`` must be where the router is mounted (default ``/ui``); ``experiment_of_run``
    maps a DAG run to its experiment's name (None: not an experiment's run).
    """
    links = links or Links(base="/ui")
    router = APIRouter(dependencies=list(dependencies))

    def answer(render: Callable[[], Page | str]) -> HTMLResponse:
        try:
            content = render()
            return HTMLResponse(content if isinstance(content, str) else content.html())
        except ui_pages.PageError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @router.get("/experiments", response_class=HTMLResponse)
    def list_experiments() -> HTMLResponse:
        return answer(lambda: ui_pages.list_html(store_factory(), links))

    @router.get("/experiments/{name}", response_class=HTMLResponse)
    def show_experiment(name: str) -> HTMLResponse:
        return answer(lambda: ui_pages.experiment_html(store_factory(), name, links))

    @router.get("/experiments/{name}/report.html", response_class=HTMLResponse)
    def report(name: str) -> HTMLResponse:
        return answer(lambda: ui_pages.report_html(store_factory(), name))

    @router.get("/experiments/{name}/final/report.html", response_class=HTMLResponse)
    def final_report(name: str) -> HTMLResponse:
        return answer(lambda: ui_pages.stored_report(store_factory(), name).decode("utf-8"))

    @router.get("/experiments/{name}/rounds/{round_}/failures/{site}", response_class=HTMLResponse)
    def failure(name: str, round_: int, site: str) -> HTMLResponse:
        return answer(lambda: ui_pages.failure_html(store_factory(), name, round_, site, links))

    @router.get("/compare", response_class=HTMLResponse)
    def compare(e: Annotated[list[str], Query()] = []) -> HTMLResponse:  # noqa: B006 (FastAPI copies it)
        return answer(lambda: ui_pages.compare_html(store_factory(), e, links))

    @router.get("/runs/{dag_id}/{run_id}")
    def dag_run(dag_id: str, run_id: str) -> Response:
        name = experiment_of_run(dag_id, run_id)
        if name is None:
            return HTMLResponse(
                f"<p>Run {e(run_id)} of {e(dag_id)} is not a step of a federated experiment "
                "(or it started one before its first step). "
                f"<a href='{links.base}/experiments'>All experiments</a></p>"
            )
        return RedirectResponse(links.experiment(name), status_code=307)

    @router.get("/static/{name:path}")
    def static(name: str) -> Response:
        try:
            data, media_type = ui_pages.static_file(name)
        except ui_pages.PageError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        return Response(data, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    return router
