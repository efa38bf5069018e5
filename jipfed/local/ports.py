"""Free TCP ports on 127.0.0.1 and how to tell that a server lost one to another process."""

from __future__ import annotations

import re
import socket

#: What servers write when the port they were given is taken (Linux errno text, Orthanc, uvicorn).
_PORT_TAKEN = re.compile(r"already in use|cannot bind|errno 98", re.IGNORECASE)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS may hand it out again later).

    A server started on it can lose it to another process before it binds: launchers that pick
    ports this way retry with fresh ones when :func:`port_taken` finds the server's complaint.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_taken(log_text: str) -> bool:
    """Whether a server's log says a port it was given is already in use."""
    return bool(_PORT_TAKEN.search(log_text))
