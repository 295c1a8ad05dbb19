"""A live uvicorn server on 127.0.0.1 in a background thread, for tests that talk HTTP to the app."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn


class LiveServer:
    """`with LiveServer(app) as server:` serves `app` at `server.url` (a free port) until the block ends."""

    def __init__(self, app):
        self.app = app

    def __enter__(self) -> LiveServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # log_config=None: uvicorn's own logging setup would close the handlers already installed (absl's,
        # once jax is imported, closes the stream it holds: pytest's capture file).
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off", log_config=None))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
