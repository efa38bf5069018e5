"""A whole federation on one machine: N sites with their own PACS, one Airflow, one model store.

This is what ``jipfed demo`` and the end-to-end tests run. Everything is real: one Orthanc per
site holding the site's synthetic DICOM, ``airflow standalone`` (scheduler, triggerer, DAG
processor, API server on 127.0.0.1) running the central DAG, the JIP Federated plugin (the central
endpoint sites talk to) and one site DAG pair per site (``JIPFED_HOSTED_SITES``), each site with
its own identity Variable, PACS Connection and site token. Only the hosting is shared: a site
reaches the central over HTTP exactly as a remote hospital would.

Connections and Variables are given to Airflow as ``AIRFLOW_CONN_*`` / ``AIRFLOW_VAR_*``
environment variables, so nothing is written to Airflow's database by hand — except, on request
(``store_connection_in_database``), the model store Connection, written through the REST API as
an admin would in the UI (then Airflow 3's triggerer and workers can only get it through the API
server).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jipfed.airflow_rest import AirflowRestClient
from jipfed.central.tokens import site_token
from jipfed.imaging.dicomweb import upload_folder
from jipfed.imaging.pacs import PacsError
from jipfed.imaging.synth import DEFAULT_SHAPE, ORIENTATIONS, default_site_profiles, write_dataset
from jipfed.local.airflow import AirflowStandalone, default_airflow_bin
from jipfed.local.dags import dag_folder
from jipfed.local.orthanc import OrthancServer
from jipfed.storage.factory import open_store
from jipfed.storage.state import ExperimentStore, Status

logger = logging.getLogger(__name__)

CENTRAL_DAG = "jipfed_central"
STORE_CONN_ID = "jipfed_model_store_default"
#: Airflow's local settings: tasks start with torch & co. already imported (jipfed.airflow_preload).
LOCAL_SETTINGS = "from jipfed.airflow_preload import preload_for_component\n\npreload_for_component()\n"
#: Central runs end in one of these states.
FINISHED_RUN_STATES = ("success", "failed")


def conn_env_name(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def var_env_name(key: str) -> str:
    return f"AIRFLOW_VAR_{key.upper()}"


@dataclass
class LocalSite:
    """One simulated hospital: its id, PACS and persistent data folder."""

    site_id: str
    pacs: OrthancServer
    data_root: Path
    fetch_transport: str

    @property
    def pacs_conn_id(self) -> str:
        return f"jipfed_pacs_{self.site_id.replace('-', '_')}"

    @property
    def central_conn_id(self) -> str:
        return f"jipfed_central_{self.site_id.replace('-', '_')}"

    @property
    def push_conn_id(self) -> str:
        return f"jipfed_site_{self.site_id}"

    @property
    def identity_variable(self) -> str:
        return f"jipfed_site__{self.site_id}"

    @property
    def site_dag(self) -> str:
        return f"jipfed_site__{self.site_id}"

    @property
    def pull_dag(self) -> str:
        return f"jipfed_site_pull__{self.site_id}"


@dataclass
class LocalFederation:
    """Start with :meth:`start` (or as a context manager); see the module docstring.

    Args:
        workdir: everything lives here (PACS storage, site data, store, Airflow home).
        n_sites, cases_per_site, shape, seed: the synthetic data set (as ``jipfed synth``).
        dags_folder: the DAG files (default: the installed package's, or ``dags/`` of a checkout).
        store_url: the model store; None = ``<workdir>/store`` (local folder).
        airflow_env: extra Airflow settings (``AIRFLOW__...``) for the standalone.
        progress: progress bars while writing the data set.
        store_connection_in_database: put the model store Connection in Airflow's database (REST
            API) instead of the environment.
        preprocess: the sites' preprocessing settings (``PreprocessConfig`` fields, in each site's
            identity Variable); None = the defaults.
    """

    workdir: Path
    n_sites: int = 3
    cases_per_site: int = 6
    shape: tuple[int, int, int] = DEFAULT_SHAPE
    seed: int = 0
    dags_folder: Path = field(default_factory=dag_folder)
    airflow_env: Mapping[str, str] = field(default_factory=dict)
    progress: bool = True
    store_connection_in_database: bool = False
    preprocess: Mapping[str, Any] | None = None
    sites: list[LocalSite] = field(default_factory=list, init=False)
    airflow: AirflowStandalone | None = field(default=None, init=False)
    _stack: ExitStack = field(default_factory=ExitStack, init=False)
    token_secret: str = field(default_factory=lambda: secrets.token_hex(32), init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.store_root = self.workdir / "store"

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> LocalFederation:
        """Write the data set, start and fill one PACS per site, then start Airflow."""
        try:
            self._start_sites()
            self.airflow = self._new_airflow()
            self._stack.callback(self.stop_airflow)
            self._start_airflow()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stack.close()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_sites(self) -> None:
        profiles = default_site_profiles(self.n_sites, self.cases_per_site, orientations=ORIENTATIONS)
        synth_dir = self.workdir / "synth"
        write_dataset(synth_dir, profiles, shape=self.shape, seed=self.seed, progress=self.progress)
        for index, profile in enumerate(profiles):
            pacs = self._stack.enter_context(OrthancServer(self.workdir / "pacs" / profile.site_id))
            upload = upload_folder(pacs.pacs_config, synth_dir / profile.site_id / "dicom")
            if not upload.ok:
                raise PacsError(f"upload to {profile.site_id}'s PACS incomplete: {upload}")
            logger.info("%s: %d instances in its PACS", profile.site_id, upload.stored)
            self.sites.append(
                LocalSite(
                    site_id=profile.site_id,
                    pacs=pacs,
                    data_root=self.workdir / "sites" / profile.site_id,
                    fetch_transport=("dicomweb", "cget")[index % 2],
                )
            )

    def _new_airflow(self, port: int | None = None) -> AirflowStandalone:
        airflow = AirflowStandalone(
            self.workdir / "airflow",
            self.dags_folder,
            port=port,
            password=self.airflow.password if self.airflow else None,
            airflow_bin=default_airflow_bin(),
            # Three sites' tasks plus the central's at once (deferred sensors hold no slot).
            parallelism=8,
        )
        airflow.extra_env = {**self.environment(airflow.base_url, airflow.password), **self.airflow_env}
        return airflow

    def _start_airflow(self) -> None:
        """Start Airflow and wait until the DAG processor parsed every DAG (import errors fail here)."""
        assert self.airflow is not None
        settings = self.airflow.home / "config" / "airflow_local_settings.py"
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(LOCAL_SETTINGS)
        self.airflow.start()
        if self.store_connection_in_database:
            self._write_store_connection()
        for dag_id in self.dag_ids:
            self.airflow.wait_for_dag(dag_id, timeout_s=600.0)

    def store_connection(self) -> dict[str, Any]:
        """The model store Connection (a local folder, conn_type ``fs``)."""
        return {"conn_type": "fs", "extra": {"path": str(self.store_root)}}

    def _write_store_connection(self) -> None:
        """Create the model store Connection in Airflow's database (kept there across a restart)."""
        existing = self.client.request("GET", f"/api/v2/connections/{STORE_CONN_ID}", expect=(200, 404))
        if existing and existing.get("connection_id") == STORE_CONN_ID:
            return  # a restart: the database kept it (a second POST fails there, not always with 409)
        connection = self.store_connection()
        body = {"connection_id": STORE_CONN_ID, **connection, "extra": json.dumps(connection["extra"])}
        self.client.request("POST", "/api/v2/connections", json=body, expect=(200, 201))

    @property
    def dag_ids(self) -> list[str]:
        return [CENTRAL_DAG, *(dag for site in self.sites for dag in (site.site_dag, site.pull_dag))]

    def stop_airflow(self) -> None:
        if self.airflow is not None:
            self.airflow.stop()

    def ensure_airflow_running(self) -> bool:
        """Start Airflow again (same home, database and port) if it is not running, e.g. after a
        failed restart; returns whether it had to."""
        assert self.airflow is not None, "start() first"
        if self.airflow.running:
            return False
        port = self.airflow.port
        self.airflow.stop()
        self.airflow = self._new_airflow(port)
        self._start_airflow()
        return True

    def crash_and_restart_airflow(self) -> None:
        """Kill every Airflow process at once (SIGKILL, as a crash would) and start it again."""
        assert self.airflow is not None
        port = self.airflow.port
        self.airflow.kill()
        self.airflow = self._new_airflow(port)
        self._start_airflow()

    # -- configuration ----------------------------------------------------------------------------

    def environment(self, central_url: str, admin_password: str) -> dict[str, str]:
        """Connections, Variables and settings of the central and of every hosted site."""
        env = {
            "JIPFED_HOSTED_SITES": ",".join(site.site_id for site in self.sites),
            "AIRFLOW__JIPFED__SITE_TOKEN_SECRET": self.token_secret,
            # Sites poll the central and the central checks for updates twice a second (default 30 s):
            # one machine, cheap checks, and each wait sits on a round's critical path.
            "JIPFED_POLL_INTERVAL_S": "0.5",
            # The scheduler looks for schedulable tasks every 0.2 s when idle (default 1 s).
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            # After a crash, tasks that were running are noticed (and retried) after 60 s, not 300 s.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
        }
        if not self.store_connection_in_database:
            env[conn_env_name(STORE_CONN_ID)] = json.dumps(self.store_connection())
        for site in self.sites:
            pacs = site.pacs.pacs_config
            env[conn_env_name(site.pacs_conn_id)] = json.dumps(
                {
                    "conn_type": "jipfed_pacs",
                    "host": pacs.dicomweb_url.rsplit("/dicom-web", 1)[0],
                    "login": pacs.username,
                    "password": pacs.password,
                    "extra": {"dimse_port": pacs.dimse_port, "calling_aet": pacs.calling_aet},
                }
            )
            env[conn_env_name(site.central_conn_id)] = json.dumps(
                {
                    "conn_type": "http",
                    "host": f"{central_url}/jipfed",
                    "password": site_token(self.token_secret, site.site_id),
                }
            )
            env[conn_env_name(site.push_conn_id)] = json.dumps(
                {
                    "conn_type": "http",
                    "host": central_url,
                    "login": "admin",
                    "password": admin_password,
                    "extra": {"dag_id": site.site_dag},
                }
            )
            env[var_env_name(site.identity_variable)] = json.dumps(
                {
                    "site_id": site.site_id,
                    "data_root": str(site.data_root),
                    "pacs_conn_id": site.pacs_conn_id,
                    "central_conn_id": site.central_conn_id,
                    "fetch_transport": site.fetch_transport,
                    **({"preprocess": dict(self.preprocess)} if self.preprocess else {}),
                }
            )
        return env

    # -- experiments ------------------------------------------------------------------------------

    @property
    def client(self) -> AirflowRestClient:
        assert self.airflow is not None, "start() first"
        return self.airflow.client

    def experiment_store(self, experiment: str) -> ExperimentStore:
        return ExperimentStore(open_store(self.store_root), experiment)

    def enable_sites(self, transport: str) -> None:
        """Unpause the sites' DAGs of ``transport`` (pull: the @continuous DAGs start polling) and
        pause those of the other one, so that each site answers a step once, by that transport."""
        for site in self.sites:
            used, other = (
                (site.site_dag, site.pull_dag) if transport == "push" else (site.pull_dag, site.site_dag)
            )
            self.client.set_paused(other, True)
            self.client.unpause(used)
        self.client.unpause(CENTRAL_DAG)

    def trigger(self, params: Mapping[str, Any]) -> str:
        """Trigger the central DAG through the REST API with ``params``; returns the run id."""
        conf = {"sites": [site.site_id for site in self.sites], **params}
        run = self.client.trigger_dag_run(CENTRAL_DAG, conf)
        logger.info("triggered %s run %s", CENTRAL_DAG, run["dag_run_id"])
        return str(run["dag_run_id"])

    def wait(
        self,
        experiment: str,
        timeout_s: float,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
        poll_s: float = 1.0,
    ) -> Status:
        """Wait until the experiment finished or failed (from its state in the store).

        ``on_step(step, record)`` is called once per completed step, in order. Raises TimeoutError
        naming the step it is stuck at, with the failed central runs' task logs.
        """
        exp_store = self.experiment_store(experiment)
        seen = 0
        deadline = time.monotonic() + timeout_s
        while True:
            state = exp_store.load_state() if exp_store.store.exists(exp_store.layout.state()) else None
            if state is not None:
                for record in state.history[seen:]:
                    if on_step is not None:
                        on_step(record.step, record.to_dict())
                seen = len(state.history)
                if state.status in (Status.FINISHED, Status.FAILED):
                    return state.status
            # only this experiment's runs: another experiment's failure is not this one's
            failed = [r for r in self.central_runs(experiment) if r["state"] == "failed"]
            if failed:
                logs = (
                    self.airflow.failed_task_logs(CENTRAL_DAG, failed[-1]["dag_run_id"])
                    if self.airflow
                    else ""
                )
                raise RuntimeError(f"central run {failed[-1]['dag_run_id']} failed:\n{logs[-6000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"experiment {experiment!r} not finished after {timeout_s:.0f} s "
                    f"(at step {state.next_step if state else 'not started'})"
                )
            time.sleep(poll_s)

    def wait_for_step(self, experiment: str, step: int, timeout_s: float) -> None:
        """Wait until plan step ``step`` of ``experiment`` is complete."""
        exp_store = self.experiment_store(experiment)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if exp_store.store.exists(exp_store.layout.state()) and exp_store.load_state().next_step > step:
                return
            time.sleep(0.5)
        raise TimeoutError(f"experiment {experiment!r}: step {step} not complete after {timeout_s:.0f} s")

    def central_runs(self, experiment: str | None = None) -> list[dict[str, Any]]:
        """The central DAG's runs (of ``experiment`` only, if given), oldest first."""
        runs = self.dag_runs(CENTRAL_DAG)
        return [
            r for r in runs if experiment is None or (r.get("conf") or {}).get("experiment") == experiment
        ]

    def dag_runs(self, dag_id: str) -> Iterator[dict[str, Any]]:
        """The DAG's runs, oldest first (REST API)."""
        data = self.client.request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"order_by": "run_after", "limit": 1000}
        )
        yield from data["dag_runs"]
