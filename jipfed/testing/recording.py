"""An ASGI wrapper that keeps every request the central receives, for scans of what left a site."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class Recorder:
    """Keeps every request line, header (but ``Authorization``) and body ``app`` receives."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.received: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.received.append(scope["path"].encode() + b"?" + scope.get("query_string", b""))
        self.received += [k + b": " + v for k, v in scope["headers"] if k.lower() != b"authorization"]

        async def recording() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                self.received.append(message.get("body", b""))
            return message

        await self.app(scope, recording, send)

    def found(self, words: list[str]) -> list[str]:
        """Those of ``words`` that occur in anything received."""
        sent = b"\n".join(self.received)
        return sorted({word for word in words if word and word.encode() in sent})
