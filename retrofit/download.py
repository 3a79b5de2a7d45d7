"""Pretrained weights over the network: fast and quiet when there is no network.

Offline, Hugging Face's client (timm's weights) retries each request five times with
back-off, about 50 s and a warning per try, and torch.hub (torchvision's weights) calls
``urlopen`` without a timeout, which waits as long as the operating system lets a
connection hang. So before a download, :func:`unreachable` opens one TCP connection to the
host that serves the weights (or to the proxy the environment names for it), bounded by
:data:`PROBE_TIMEOUT` seconds, name lookup included. When that works, nothing else
changes: the libraries download as they always do. When it fails, the weights can only
come from the local cache: Hugging Face runs in its offline mode (the cache, or an
immediate error; no retries, no warnings), and a torch.hub file that is not in its cache
is not requested at all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator

__all__ = ["PROBE_TIMEOUT", "unreachable", "hf_endpoint", "hf_offline", "hf_offline_requested", "hf_quiet",
           "torch_hub_cached"]

PROBE_TIMEOUT = 3.0  # seconds for one TCP connection, name lookup included


def _host_port(url: str) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why no TCP connection to ``url``'s host opens within ``timeout`` seconds; None if one does.

    A proxy named by the environment for the URL's scheme (``https_proxy``, ``all_proxy``,
    unless ``no_proxy`` exempts the host) is what gets connected to, since that is where
    the download would go. The name lookup runs inside the same time limit (it has no
    timeout of its own), in a thread left behind if it hangs.

    Example:
        >>> unreachable("https://127.0.0.1:9/")
        'cannot reach 127.0.0.1:9: Connection refused'
    """
    host, port = _host_port(url)
    target, via = f"{host}:{port}", ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(urllib.parse.urlsplit(url).scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(host):
        host, port = _host_port(proxy)
        via = f" through the proxy {host}:{port}"
    outcome: list[OSError | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            outcome.append(e)
        else:
            outcome.append(None)

    thread = threading.Thread(target=connect, name="retrofit-network-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        return f"no answer from {target}{via} within {timeout:g} s"
    error = outcome[0]
    if error is None:
        return None
    return f"cannot reach {target}{via}: {error.strerror or error}"


def hf_endpoint() -> str:
    """The Hugging Face Hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hf_offline_requested() -> bool:
    """Whether the user already put Hugging Face in offline mode (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Hugging Face Hub in offline mode while the block runs: what ``HF_HUB_OFFLINE=1`` does,
    for this process only (the library read that variable when it was imported)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def hf_quiet() -> Iterator[None]:
    """huggingface_hub's log lines below errors off while the block runs: its "Retrying in
    1s [Retry 1/5]" and the request error before each retry are warnings on its logger,
    printed to stderr; the error that ends the retries is raised. A verbosity the user set
    (``HF_HUB_VERBOSITY``) is kept."""
    if os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    logger = logging.getLogger("huggingface_hub")
    saved = logger.level
    logger.setLevel(max(logging.ERROR, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(saved)


def torch_hub_cached(url: str) -> bool:
    """Whether torch.hub already has the file ``url`` names (``load_state_dict_from_url`` then
    reads it and never touches the network)."""
    import torch.hub

    name = os.path.basename(urllib.parse.urlsplit(url).path)
    return os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", name))
