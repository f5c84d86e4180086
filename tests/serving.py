"""Start the web UI inside a test process, as ``python app.py ARGS`` would, on a free local port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(argv: list[str]) -> Iterator[tuple[str, Any]]:
    """Yield ``(url, service)`` of the running app; the server is closed on exit."""
    import app

    port = free_port()
    args = app.parse_args([*argv, "--port", str(port)])
    service = app.make_service(args)
    demo = app.build_demo(service)
    app.launch(demo, service, args, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", service
    finally:
        demo.close()
