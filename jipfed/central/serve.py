"""Serve an ASGI app (the central endpoint) with uvicorn in a background thread.

For tests and the demo, and for running the endpoint without Airflow (the plugin is the way to
serve it from the central's Airflow API server)::

    base_url, stop = serve_in_thread(create_app(lambda: store, secret))
    try:
        CentralClient(base_url, token).pending_work()
    finally:
        stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

logger = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The server did not start (port taken, app failed to load) within the timeout."""


def serve_in_thread(
    app: ASGIApp,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    startup_timeout_s: float = 30.0,
    log_level: str = "warning",
) -> tuple[str, Callable[[], None]]:
    """Start uvicorn serving ``app`` on ``host:port`` (0 = a free port) in a daemon thread.

    Returns once the server accepts connections: ``(base_url, stop)``; ``stop()`` shuts the
    server down (open requests finish) and waits for the thread.

    Raises:
        ServeError: the server did not start within ``startup_timeout_s``.
    """
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{host}:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=5)
            raise ServeError(f"uvicorn did not start on {host}:{port} within {startup_timeout_s:.0f} s")
        time.sleep(0.02)
    bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
    base_url = (
        f"http://[{bound_host}]:{bound_port}" if ":" in bound_host else f"http://{bound_host}:{bound_port}"
    )
    logger.info("serving on %s", base_url)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            raise ServeError(f"uvicorn on {base_url} did not stop within 10 s")

    return base_url, stop
