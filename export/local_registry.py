"""A loopback OCI registry for trying push/pull on one machine: Debian's docker-registry on 127.0.0.1
with a private config (temporary storage, deletes enabled, optional Basic auth). Used by the registry
tests and bench/deploy.py; never the packaged system service."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import requests


def start(tmp: Path, htpasswd: str | None = None, wait_s: float = 20) -> tuple[subprocess.Popen, str] | None:
    """Start a registry storing under ``tmp`` (Basic auth when given htpasswd lines, bcrypt only);
    (process, "127.0.0.1:PORT"), or None when docker-registry is not installed."""
    binary = shutil.which("docker-registry")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp / 'data'}\n"
                      f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n")
    if htpasswd:
        (tmp / "htpasswd").write_text(htpasswd + "\n")
        with open(config, "a") as f:
            f.write(f"auth:\n  htpasswd:\n    realm: edgeprune-tests\n    path: {tmp / 'htpasswd'}\n")
    log = open(tmp / "registry.log", "w")
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code in (200, 401):
                return proc, f"127.0.0.1:{port}"
        except requests.ConnectionError:
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"docker-registry did not start: {(tmp / 'registry.log').read_text()[-2000:]}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (shutdown takes a second or two), then SIGKILL if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
