"""Who this site is: read from an Airflow Variable at run time, never from the DAG file.

The Variable ``jipfed_site`` holds the identity's JSON (see :mod:`jipfed.tasks.identity`, where
:class:`SiteIdentity` lives; it includes the ``execution`` key that moves heavy steps to pods).

One Airflow may host several identities (a demo or test on one machine): the environment
variable ``JIPFED_HOSTED_SITES="site-a,site-b"``, read when the DAG file is parsed, makes one
DAG pair per identity, each reading the Variable ``jipfed_site__<site id>``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jipfed.operators.compat import AirflowFailException, Variable

from jipfed.storage.layout import validate_slug
from jipfed.tasks import identity as core
from jipfed.tasks.identity import CACHE_DIRS, PREPROCESS_KEYS, SiteIdentity

__all__ = [
    "CACHE_DIRS",
    "HOSTED_SITES_ENV",
    "IDENTITY_VARIABLE",
    "PREPROCESS_KEYS",
    "SiteIdentity",
    "hosted_sites",
    "identity_variable",
    "load_identity",
    "parse_identity",
]

IDENTITY_VARIABLE = "jipfed_site"
HOSTED_SITES_ENV = "JIPFED_HOSTED_SITES"


def identity_variable(site_id: str | None = None) -> str:
    """The Variable holding an identity: ``jipfed_site``, or ``jipfed_site__<id>`` for a hosted one."""
    return (
        IDENTITY_VARIABLE if site_id is None else f"{IDENTITY_VARIABLE}__{validate_slug(site_id, 'site id')}"
    )


def parse_identity(variable: str, raw: str | Mapping[str, Any] | None) -> SiteIdentity:
    """The identity from the Variable's value; ValueError naming the Variable when it is missing or invalid."""
    return core.parse_identity(f"Airflow Variable {variable!r}", raw)


def load_identity(variable: str, expected_site: str | None = None) -> SiteIdentity:
    """Read and validate the identity in ``variable`` (at run time); fail the task when it is unusable.

    Args:
        variable: the Variable's key.
        expected_site: the hosted site id the DAG was made for; the identity must name it.

    Raises:
        AirflowFailException: the Variable is missing or invalid, or names another site.
    """
    try:
        identity = parse_identity(
            variable, Variable.get(variable, None)
        )  # positional: 2.x and 3.x names differ
    except ValueError as exc:
        raise AirflowFailException(str(exc)) from exc
    if expected_site is not None and identity.site_id != expected_site:
        raise AirflowFailException(
            f"Airflow Variable {variable!r} names site {identity.site_id!r}, but this DAG is for "
            f"site {expected_site!r}"
        )
    return identity


def hosted_sites(environ: Mapping[str, str] | None = None) -> list[str | None]:
    """Site ids listed in ``JIPFED_HOSTED_SITES`` (comma separated), or ``[None]`` for a single site.

    Read when the DAG file is parsed (it decides which DAGs exist). Raises ValueError for an
    invalid or repeated id.
    """
    text = (os.environ if environ is None else environ).get(HOSTED_SITES_ENV, "")
    ids = [part.strip() for part in text.split(",") if part.strip()]
    for site_id in ids:
        validate_slug(site_id, f"site id in {HOSTED_SITES_ENV}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{HOSTED_SITES_ENV} lists a site more than once: {text!r}")
    return list(ids) or [None]
