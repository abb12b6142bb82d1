"""Test and bench scaffolding: the app under uvicorn in a background thread on a free port."""

import socket
import threading
import time

import uvicorn


class BackgroundServer:
    """`app` under uvicorn in a background thread on a free port (tests, benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        if not port:  # a free one
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.app = app
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.05)

    def stop(self, force: bool = False) -> None:
        """force: do not wait for open responses (streams) to finish: like a crash, to the clients."""
        self.server.should_exit = True
        self.server.force_exit = force
        self.thread.join(10)
