"""The experiment pages as plain functions of the store, for any web framework.

The Airflow 3 plugin app (:func:`jipfed.central.ui.ui_router`, FastAPI) and the Airflow 2 view
(``plugins/jipfed_af2_view.py``, Flask AppBuilder) both call these and turn :class:`PageError`
into an HTTP status. Nothing is cached: each call reads the store.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from jipfed.central import ui_html
from jipfed.central.ui_data import REPORT, comparison, experiment_summary, experiment_view
from jipfed.federation.dispatch import experiments_in
from jipfed.storage.base import ModelStore, ObjectNotFoundError, json_object
from jipfed.storage.layout import validate_round, validate_slug
from jipfed.storage.state import ExperimentStore

logger = logging.getLogger(__name__)

MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", "": "text/plain"}


class PageError(Exception):
    """A request the pages cannot answer: ``status`` (400, 404) and a message naming what."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def open_experiment(store: ModelStore, name: str) -> ExperimentStore:
    """The experiment ``name`` (400: not a valid name, 404: not in the store)."""
    try:
        exp_store = ExperimentStore(store, name)
    except ValueError as exc:
        raise PageError(400, str(exc)) from None
    if not store.exists(exp_store.layout.state()):
        raise PageError(404, f"no experiment {name!r} in the model store")
    return exp_store


def list_html(store: ModelStore, links: ui_html.Links) -> ui_html.Page:
    """Every experiment with its status and progress."""
    summaries: list = []
    for name in experiments_in(store):
        try:
            summaries.append((name, experiment_summary(ExperimentStore(store, name))))
        except Exception as exc:  # one unreadable experiment does not hide the others
            logger.warning("experiment %s: unreadable: %s", name, exc)
            summaries.append((name, exc))
    return ui_html.list_page(summaries, links)


def experiment_html(
    store: ModelStore, name: str, links: ui_html.Links, now: datetime | None = None
) -> ui_html.Page:
    """One experiment's page."""
    return ui_html.experiment_page(experiment_view(open_experiment(store, name), now), links)


def report_html(store: ModelStore, name: str) -> ui_html.Page:
    """The experiment's self-contained HTML report, built now."""
    return ui_html.report_page(experiment_view(open_experiment(store, name)))


def write_report(exp_store: ExperimentStore) -> str:
    """Write the experiment's HTML report next to its final model (``final/report.html``); returns the key.

    Call it after ``finalize`` (and again after the final model was scored: it is rewritten).
    """
    view = experiment_view(exp_store)
    if view["final"] is None:
        raise ValueError(f"experiment {exp_store.experiment!r} has no final model yet; finalize it first")
    return exp_store.save_final(REPORT, ui_html.report_page(view).html().encode("utf-8"), overwrite=True)


def stored_report(store: ModelStore, name: str) -> bytes:
    """The HTML report stored with the final model (404 when there is none)."""
    exp_store = open_experiment(store, name)
    try:
        return store.get_bytes(exp_store.layout.final(REPORT))
    except ObjectNotFoundError:
        raise PageError(404, f"experiment {name!r} has no report stored with a final model") from None


def failure_html(store: ModelStore, name: str, round_: int, site: str, links: ui_html.Links) -> ui_html.Page:
    """A site's failure report of one round."""
    exp_store = open_experiment(store, name)
    try:
        validate_round(round_)
        validate_slug(site, "site id")
        key = exp_store.layout.site_failure(round_, site)
    except ValueError as exc:
        raise PageError(400, str(exc)) from None
    try:
        record = json_object(store.get_json(key), key)
    except ObjectNotFoundError:
        raise PageError(
            404, f"experiment {name!r}: no failure report of site {site!r} in round {round_}"
        ) from None
    return ui_html.failure_page(name, round_, site, record, links)


def compare_html(store: ModelStore, names: Sequence[str], links: ui_html.Links) -> ui_html.Page:
    """Two or more experiments overlaid (400 with fewer)."""
    unique = list(dict.fromkeys(names))
    if len(unique) < 2:
        raise PageError(400, f"pick two or more experiments to compare (got {len(unique)})")
    return ui_html.comparison_page(comparison([open_experiment(store, n) for n in unique]), links)


def static_file(name: str) -> tuple[bytes, str]:
    """A vendored static file and its media type (404 for anything else)."""
    try:
        text = ui_html.static_text(name)
    except FileNotFoundError:
        raise PageError(404, f"no static file {name!r}") from None
    suffix = name[name.rfind(".") :] if name.rfind(".") > name.rfind("/") else ""
    return text.encode("utf-8"), MEDIA_TYPES.get(suffix, "text/plain")
