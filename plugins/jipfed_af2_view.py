"""The experiment pages on Airflow 2.11: a Flask AppBuilder view inside Airflow's own layout.

Same pages as the Airflow 3 plugin app (:mod:`jipfed.central.ui_pages`), at ``/jipfed/...``
(``experiments``, ``experiments/<exp>``, ``compare``, reports, failure reports, static files),
behind Airflow's login (``has_access_view``: a signed-in user who may see the website), GET only.
The menu entry "Federated experiments" sits under Browse. Flask and Airflow's web app are imported
here only, so this module is loaded by the plugin on Airflow 2 and never on Airflow 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from airflow.www.auth import has_access_view
from flask import Response, abort, request
from flask_appbuilder import BaseView, expose

from jipfed.central import ui_pages
from jipfed.central.ui_html import Page

ROUTE_BASE = "/jipfed"


def _store() -> Any:
    from jipfed.plugins.jipfed_plugin import open_model_store

    return open_model_store()


def _links() -> Any:
    from jipfed.plugins.jipfed_plugin import CENTRAL_DAG_ID, ui_links

    return ui_links(ROUTE_BASE, lambda run_id: f"/dags/{CENTRAL_DAG_ID}/grid?dag_run_id={quote(run_id)}")


class JipfedExperimentsView(BaseView):
    """``/jipfed/...``: the experiment pages, read-only."""

    route_base = ROUTE_BASE
    default_view = "experiments"
    template_folder = str(Path(__file__).parent / "templates")

    def _show(self, render: Any) -> Any:
        try:
            content = render()
        except ui_pages.PageError as exc:
            abort(exc.status, str(exc))
        if isinstance(content, Page):
            return self.render_template("jipfed/page.html", page=content)
        return content

    @expose("/experiments")
    @has_access_view()
    def experiments(self) -> Any:
        return self._show(lambda: ui_pages.list_html(_store(), _links()))

    @expose("/experiments/<name>")
    @has_access_view()
    def experiment(self, name: str) -> Any:
        return self._show(lambda: ui_pages.experiment_html(_store(), name, _links()))

    @expose("/experiments/<name>/report.html")
    @has_access_view()
    def report(self, name: str) -> Any:
        return self._show(lambda: ui_pages.report_html(_store(), name).html())

    @expose("/experiments/<name>/final/report.html")
    @has_access_view()
    def final_report(self, name: str) -> Any:
        return self._show(lambda: Response(ui_pages.stored_report(_store(), name), mimetype="text/html"))

    @expose("/experiments/<name>/rounds/<int:round_>/failures/<site>")
    @has_access_view()
    def failure(self, name: str, round_: int, site: str) -> Any:
        return self._show(lambda: ui_pages.failure_html(_store(), name, round_, site, _links()))

    @expose("/compare")
    @has_access_view()
    def compare(self) -> Any:
        return self._show(lambda: ui_pages.compare_html(_store(), request.args.getlist("e"), _links()))

    @expose("/static/<path:name>")
    @has_access_view()
    def static_file(self, name: str) -> Any:
        def render() -> Response:
            data, media_type = ui_pages.static_file(name)
            return Response(data, mimetype=media_type)

        return self._show(render)


def appbuilder_view() -> dict[str, Any]:
    """The plugin's ``appbuilder_views`` entry: the view with a menu item under Browse."""
    return {"name": "Federated experiments", "category": "Browse", "view": JipfedExperimentsView()}
