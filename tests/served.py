"""Servers that tests start as subprocesses, on loopback: a free port, and a server process up and answering.

``ServerProcess([sys.executable, "-m", "llava_next_plugin.serve_cli", "--model", path], log)`` appends
``--port P`` (a free loopback port), sends the process's output to the file *log* (a pipe nobody reads could
fill up and stall it) and returns once ``GET /health`` answers 200; a process that exits before then fails the
test with its log.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

__all__ = ["free_port", "ServerProcess"]


def free_port() -> int:
    """A loopback port with nothing listening on it (yet)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """*command* ``--port P`` run with *env* added to this process's environment (and one OpenMP thread, so that
    servers and the test share the cores quietly); up and answering ``/health`` within *seconds*."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str] | None = None, seconds: float = 240) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.log_path = log
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)],
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + seconds
        while not self._up():
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"the server did not answer /health within {seconds} s:\n{self.log()}")
            time.sleep(0.1)

    def _up(self) -> bool:
        if self.process.poll() is not None:
            self._log.close()
            raise AssertionError(f"the server exited with status {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(self.base + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the process if it still runs (a test that stops it gracefully waits for it first)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def terminate(self, seconds: float = 60) -> int:
        """SIGTERM, as an operator stops it; its exit status (killed if it does not exit within *seconds*)."""
        self.process.terminate()
        try:
            return self.process.wait(seconds)
        finally:
            self.stop()
