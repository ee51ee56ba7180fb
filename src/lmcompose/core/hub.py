"""Is the Hugging Face hub reachable? Asked once per process, answered in seconds.

Without a network, transformers and datasets retry every request with backoff for ~30-50 s and end in a
ConnectionError. lmcompose asks first: `hub_unreachable` returns why the hub cannot be used
(``HF_HUB_OFFLINE`` is set, or no TCP connection to the hub, or to the HTTPS proxy, opened within
`PROBE_TIMEOUT_S`), or None. Callers then use only local copies and, when there are none, raise an
error that names the file or model that was needed and where to put it.

Example::

    reason = hub_unreachable()
    if reason:
        raise FileNotFoundError(f"c4 needs c4/c4_validation_2k.parquet under --data-dir; {reason}")
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0
DEFAULT_ENDPOINT = "https://huggingface.co"


def _offline_flag() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set"
    return None


def _probe_address() -> tuple[str, int, str]:
    """(host, port, description) of what a hub request connects to first: the proxy, if one is set."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(endpoint.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or 80, f"the proxy {p.hostname}:{p.port or 80} (for {host})"
    return host, port, f"{host}:{port}"


def _connect_error(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to (host, port) opens within `timeout`, else why not."""
    # getaddrinfo ignores socket timeouts: probe in a daemon thread and stop waiting after `timeout`.
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as err:
            result.append(err.strerror or str(err) or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:g} s"


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    host, port, what = _probe_address()
    error = _connect_error(host, port, PROBE_TIMEOUT_S)
    return None if error is None else f"the Hugging Face hub cannot be reached ({what}: {error})"


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now, in words (ends without a full stop), or None when it can. The
    network probe runs once per process (`reset` forgets its answer); the offline variables every call."""
    return _offline_flag() or _probe()


def reset() -> None:
    """Forget the cached probe (tests; a process that came online)."""
    _probe.cache_clear()
