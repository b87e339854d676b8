"""Whether the Hugging Face Hub can be reached, decided at once.

huggingface_hub retries a failed connection with back-off, so a hub id without network used to
take about 40 s to fail. One TCP connection to the endpoint, bounded by `TIMEOUT` (name lookup
included, which has no timeout of its own), answers the question before anything asks the Hub.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

TIMEOUT = 3.0
_OFF = ("1", "on", "yes", "true")


def hub_unreachable() -> str | None:
    """None when the Hub's endpoint accepts a connection; otherwise why not, in a few words."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFF:
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=TIMEOUT).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or type(e).__name__)

    worker = threading.Thread(target=connect, daemon=True)  # a stuck name lookup is left behind, not waited for
    worker.start()
    worker.join(TIMEOUT)
    if not outcome:
        return f"no answer from {host} within {TIMEOUT:g} s"
    return None if outcome[0] is None else f"{host} cannot be reached: {outcome[0]}"
