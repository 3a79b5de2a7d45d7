"""The network probe before a download, and the offline switches it drives (no real network)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from retrofit.download import hf_offline, torch_hub_cached, unreachable


def test_a_listening_port_is_reachable_and_a_closed_one_is_not() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        assert unreachable(f"http://127.0.0.1:{port}/weights.bin") is None
    assert unreachable(f"http://127.0.0.1:{port}/weights.bin") == f"cannot reach 127.0.0.1:{port}: Connection refused"


def test_the_probe_goes_where_the_download_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the proxy the environment names for the scheme, unless no_proxy exempts the host."""
    for name in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")
    assert unreachable("https://download.pytorch.org/models/x.pth") == (
        "cannot reach download.pytorch.org:443 through the proxy 127.0.0.1:9: Connection refused"
    )
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert unreachable(f"https://127.0.0.1:{server.getsockname()[1]}/") is None  # exempt: direct


def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    """.invalid never resolves (RFC 2606); a resolver that hangs instead is cut off at the timeout."""
    why = unreachable("https://no-such-host.invalid/x.bin", timeout=2.0)
    assert why is not None
    assert why.startswith("cannot reach no-such-host.invalid:443: ") or why == (
        "no answer from no-such-host.invalid:443 within 2 s"
    )


def test_hf_offline_is_undone() -> None:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    with hf_offline():
        assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    assert constants.HF_HUB_OFFLINE == before


def test_torch_hub_cache_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where torch.hub.load_state_dict_from_url looks first: TORCH_HOME/hub/checkpoints/NAME."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert not torch_hub_cached(url)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"")
    assert torch_hub_cached(url)
