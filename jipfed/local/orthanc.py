"""``OrthancServer``: a real Orthanc (with the DICOMweb plugin) in a folder of its own, for demos and tests.

Usage::

    with OrthancServer() as pacs:
        upload_folder(pacs.pacs_config, "dicom/")
        pacs.stop()   # "PACS down" (kill(): a crash); start() brings it back: same data, ports, credentials

Orthanc has no bind-address option and listens on all interfaces; ``RemoteAccessAllowed`` stays
false so peers other than 127.0.0.1 get 401 (field-notes.md). The calling AE title is registered in
``DicomModalities`` with find/get/move/store allowed, else Orthanc aborts its associations.
Orthanc cannot be told to pick its own ports: when another process takes a port picked for it
before Orthanc binds it, the first start is tried again on fresh ports.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import requests

from jipfed.imaging.pacs import PacsConfig
from jipfed.local.ports import free_port, port_taken

log = logging.getLogger(__name__)

DEFAULT_BINARY = Path("/usr/sbin/Orthanc")
DEFAULT_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
LOG_TAIL_CHARS = 4000
#: Attempts of a first start on freshly picked ports when one of them was taken meanwhile.
PORT_ATTEMPTS = 3


class OrthancError(RuntimeError):
    """Orthanc or its DICOMweb plugin is missing, or the server did not start."""

    #: Set when the start failed because a port given to Orthanc was taken.
    port_taken: bool = False


class OrthancServer:
    """A running Orthanc; use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        workdir: Folder for config, storage, index and log; kept. None = a temp folder, removed on exit.
        username: User registered in Orthanc (HTTP basic auth).
        password: Its password; None = a random hex string (no leading '-' to trip up a CLI).
        http_port, dicom_port: Ports; None = free ones picked at the first start (kept on restart).
        calling_aet: AE title registered as a modality allowed to find/get/move/store.
        binary, dicomweb_plugin: Locations of the Orthanc executable and its DICOMweb plugin.
        startup_timeout_s: How long to wait for ``/system`` to answer.
    """

    dicom_aet = "ORTHANC"

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        username: str = "jipfed",
        password: str | None = None,
        http_port: int | None = None,
        dicom_port: int | None = None,
        calling_aet: str = "JIPFED",
        binary: str | Path = DEFAULT_BINARY,
        dicomweb_plugin: str | Path = DEFAULT_DICOMWEB_PLUGIN,
        startup_timeout_s: float = 30.0,
    ) -> None:
        if not username or ":" in username:
            raise ValueError(f"username must be non-empty without ':', got {username!r}")
        if startup_timeout_s <= 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s!r}")
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir).resolve() if workdir is not None else None
        self.username = username
        self.password = password if password is not None else secrets.token_hex(16)
        self.http_port = http_port
        self.dicom_port = dicom_port
        self._pick_ports = http_port is None and dicom_port is None
        self.calling_aet = calling_aet
        self.binary = Path(binary)
        self.dicomweb_plugin = Path(dicomweb_plugin)
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None

    # -- connection details -------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """Orthanc's REST root, e.g. ``http://127.0.0.1:8042``."""
        if self.http_port is None:
            raise OrthancError("Orthanc has not been started yet")
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.base_url}/dicom-web"

    @property
    def pacs_config(self) -> PacsConfig:
        """A :class:`PacsConfig` for this server (DICOMweb URL, DIMSE port, credentials)."""
        return PacsConfig(
            dicomweb_url=self.dicomweb_url,
            username=self.username,
            password=self.password,
            dimse_host="127.0.0.1",
            dimse_port=self.dicom_port,
            called_aet=self.dicom_aet,
            calling_aet=self.calling_aet,
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise OrthancError("Orthanc has not been started yet")
        return self.workdir / "orthanc.log"

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> OrthancServer:
        """Write the config and start Orthanc; returns once ``/system`` answers. No-op if running."""
        if self.running:
            return self
        self._check_installed()
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="jipfed-orthanc-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            if self.http_port is None:
                self.http_port = free_port()
            if self.dicom_port is None:
                self.dicom_port = free_port()
            try:
                self._start_once()
                break
            except OrthancError as exc:
                if not (self._pick_ports and exc.port_taken) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("Orthanc lost a port to another process; starting again on fresh ports")
                self.http_port = self.dicom_port = None
        self._pick_ports = False  # from now on the ports stay (a restart keeps them)
        return self

    def _start_once(self) -> None:
        config_path = self.workdir / "config.json"
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the password
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self._config(), handle, indent=2)
        started = time.monotonic()
        log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(self.binary), str(config_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                start_new_session=True,  # Ctrl-C in a terminal reaches us only; we stop Orthanc cleanly
            )
        try:
            self._wait_ready()
        except OrthancError as exc:
            self.stop()
            exc.port_taken = port_taken(self.log_tail(chars=None, start=log_start))
            raise
        except BaseException:
            self.stop()
            raise
        log.info(
            "Orthanc up at %s (DIMSE port %s) in %.2f s",
            self.base_url,
            self.dicom_port,
            time.monotonic() - started,
        )

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after ``timeout_s``); data and ports are kept for a restart."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("Orthanc did not stop within %.0f s of SIGTERM; killing it", timeout_s)
                process.kill()
                process.wait()
        log.info("Orthanc stopped (exit code %s)", process.returncode)

    def kill(self) -> None:
        """Simulate a crash: SIGKILL, no clean shutdown (restartable with :meth:`start`)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
            log.info("Orthanc killed")

    def close(self) -> None:
        """Stop, and remove the folder if it was a temp folder of our own."""
        self.stop()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> OrthancServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def log_tail(self, chars: int | None = LOG_TAIL_CHARS, start: int = 0) -> str:
        """The last ``chars`` characters (None: all) of Orthanc's log from byte ``start`` ("" if none yet)."""
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(start)
                text = handle.read().decode("utf-8", errors="replace")
        except (OSError, OrthancError):
            return ""
        return text if chars is None else text[-chars:]

    # -- internals ----------------------------------------------------------------------------
    def _check_installed(self) -> None:
        if not self.binary.is_file():
            raise OrthancError(f"Orthanc binary not found at {self.binary} (Debian: apt-get install orthanc)")
        if not self.dicomweb_plugin.is_file():
            raise OrthancError(
                f"Orthanc DICOMweb plugin not found at {self.dicomweb_plugin} "
                "(Debian: apt-get install orthanc-dicomweb)"
            )

    def _config(self) -> dict:
        if self.workdir is None:
            raise OrthancError("no working folder")
        return {
            "Name": "jipfed-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.dicom_aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [str(self.dicomweb_plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {
                "jipfed": {
                    "AET": self.calling_aet,
                    "Host": "127.0.0.1",
                    "Port": 104,  # only used as a C-MOVE destination; we use C-GET
                    "AllowEcho": True,
                    "AllowFind": True,
                    "AllowGet": True,
                    "AllowMove": True,
                    "AllowStore": True,
                }
            },
            "SaveJobs": False,
            "StorageCompression": False,
        }

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.base_url}/system"
        last_error = "no answer"
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                raise OrthancError(f"Orthanc exited during startup (code {code}); log:\n{self.log_tail()}")
            try:
                response = requests.get(url, auth=(self.username, self.password), timeout=2)
            except requests.RequestException as exc:
                last_error = str(exc)
            else:
                if response.ok:
                    return
                last_error = f"HTTP {response.status_code}"
            time.sleep(0.05)
        raise OrthancError(
            f"Orthanc did not answer {url} within {self.startup_timeout_s:.0f} s ({last_error}); log:\n{self.log_tail()}"
        )
