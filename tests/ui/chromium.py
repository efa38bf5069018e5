"""A headless Debian chromium driven over the DevTools protocol (websocket-client), for the browser test.

``with Chromium(tmp_path) as browser:`` ``browser.open(url)``, ``browser.js(expression)``,
``browser.type_into(selector, text)``, ``browser.screenshot(path)``. Chromium must be installed
(``apt-get install chromium``); the test fails, not skips, without it.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
import websocket


class BrowserError(RuntimeError):
    """Chromium did not start, or a page did not do what was expected."""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    raise BrowserError("chromium is not installed: apt-get install -y chromium")


class Chromium:
    """One headless chromium with one page, driven over its DevTools websocket."""

    def __init__(self, folder: Path, width: int = 1400, height: int = 1000) -> None:
        self.folder = folder
        self.size = (width, height)
        self._ids = itertools.count(1)
        self._process: subprocess.Popen | None = None
        self._ws: websocket.WebSocket | None = None

    def __enter__(self) -> Chromium:
        try:
            self._start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start(self) -> None:
        profile = self.folder / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        (profile / "DevToolsActivePort").unlink(missing_ok=True)  # a stale one names a closed port
        self._process = subprocess.Popen(
            [
                chromium_binary(),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-dev-shm-usage",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 120  # a liveness limit: a loaded machine starts it slowly
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise BrowserError("chromium did not open its DevTools port within 120 s")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = [
            t
            for t in requests.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
            if t["type"] == "page"
        ]
        self._ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=30, suppress_origin=True
        )
        self.call("Page.enable")
        self.call("Runtime.enable")

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are dropped)."""
        assert self._ws is not None
        message_id = next(self._ids)
        self._ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message["result"]

    def js(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout_s: float = 120.0) -> Any:
        """Poll ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except BrowserError:
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise BrowserError(f"not true within {timeout_s} s: {expression}\npage: {self.js('location.href')}")

    def open(self, url: str) -> None:
        """Navigate and wait until the new document has loaded (the old one is marked, so its own
        ``readyState`` cannot pass for the new one's)."""
        self.js("window.__jipfedLeft = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__jipfedLeft && document.readyState === 'complete'")

    def type_into(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` as keyboard input (works with React's inputs)."""
        self.wait_for(f"document.querySelector({json.dumps(selector)}) !== null")
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path: Path) -> bytes:
        """Save a PNG of the viewport to ``path``; returns its bytes."""
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return data
