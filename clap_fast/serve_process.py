"""Start ``clap-fast serve`` as a child process on free localhost ports and stop it cleanly.

Used by the serving tests and ``bench/bench_serve.py``; needs only the standard library (the
readiness probe is Triton's HTTP ``/v2/health/ready``), so it runs in the main environment.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["free_ports", "descendants", "ServerProcess"]

log = logging.getLogger(__name__)


def free_ports(n: int) -> list[int]:
    """n distinct ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class ServerProcess:
    """``with ServerProcess(ckpt, ["--engine", "eager"]) as srv:`` -> ``srv.http_url`` etc.

    Args:
        checkpoint: what ``clap-fast serve`` loads.
        args: further ``clap-fast serve`` options (not the ports).
        log_path: the server's stdout / stderr go there (read back on failure).
        startup_s: how long to wait for readiness.
        models: models that must be ready too (PyTriton loads them after the server is up).
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        args: Sequence[str] = (),
        *,
        log_path: str | os.PathLike,
        startup_s: float = 300.0,
        env: dict[str, str] | None = None,
        models: Sequence[str] = ("clap_audio", "clap_text_tokens"),
    ) -> None:
        self.models = list(models)
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.http_url = f"127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(log_path)
        self.startup_s = startup_s
        self.cmd = [
            sys.executable, "-m", "clap_fast.cli", "serve", str(checkpoint), *args,
            "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
            "--metrics-port", str(self.metrics_port),
        ]  # fmt: skip
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.children: list[int] = []
        self.leftover: list[int] = []

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def ready(self) -> bool:
        """The server and every model in ``models`` answer ready."""
        paths = ["v2/health/ready", *[f"v2/models/{m}/ready" for m in self.models]]
        for path in paths:
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/{path}", timeout=2) as r:
                    if r.status != 200:
                        return False
            except (urllib.error.URLError, OSError):
                return False
        return True

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                self.children = descendants(self.proc.pid)
                return self
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {self.startup_s} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Signal the server, wait for it; kill what is left after the timeout. Returns the
        exit code (negative: killed)."""
        if self.proc is None:
            return 0
        tree = sorted(set(self.children) | set(descendants(self.proc.pid)))
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("server did not stop in %.0f s; killing it", timeout_s)
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftover = [p for p in tree if _alive(p)]
        for p in self.leftover:  # only our own server's processes
            log.warning("killing leftover server process %d", p)
            os.kill(p, signal.SIGKILL)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
