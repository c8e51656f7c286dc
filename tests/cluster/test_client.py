"""Where `KubeClient.connect` takes its kubeconfig from: kubectl's order.

`--kubeconfig` / `clientConnection.kubeconfig`, then the files of `$KUBECONFIG` (merged as kubectl
merges them), then in-cluster config. `rapproxy run` and `rapproxy bps-controller` both connect
through here, with the process environment. No API server is needed: connecting only loads the
configuration, and `host` shows which one was loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from rapproxy.cluster.client import ApiError, ClientSettings, KubeClient, kubeconfig_files


def write_kubeconfig(
    path: Path,
    *,
    clusters: dict[str, str] | None = None,
    contexts: dict[str, str] | None = None,
    users: tuple[str, ...] = (),
    current: str | None = None,
) -> Path:
    """A kubeconfig of `clusters` (name -> server) and `contexts` (name -> cluster, user "u")."""
    document: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": name, "cluster": {"server": server}}
            for name, server in (clusters or {}).items()
        ],
        "contexts": [
            {"name": name, "context": {"cluster": cluster, "user": "u"}}
            for name, cluster in (contexts or {}).items()
        ],
        "users": [{"name": name, "user": {"token": "t"}} for name in users],
    }
    if current is not None:
        document["current-context"] = current
    path.write_text(json.dumps(document))
    return path


def single(path: Path, server: str) -> Path:
    return write_kubeconfig(
        path, clusters={"c": server}, contexts={"ctx": "c"}, users=("u",), current="ctx"
    )


@pytest.fixture(autouse=True)
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """No in-cluster config, whatever machine the tests run on."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)


async def connected_host(settings: ClientSettings) -> str:
    client = await KubeClient.connect(settings)
    try:
        return client.host
    finally:
        await client.close()


async def test_kubeconfig_env_is_used_when_no_kubeconfig_is_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(single(tmp_path / "config", "https://from-env:6443")))
    assert await connected_host(ClientSettings()) == "https://from-env:6443"


async def test_configured_kubeconfig_wins_over_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(single(tmp_path / "env", "https://from-env:6443")))
    explicit = single(tmp_path / "explicit", "https://explicit:6443")
    assert await connected_host(ClientSettings(str(explicit))) == "https://explicit:6443"


async def test_missing_files_are_skipped_and_the_rest_merged_as_kubectl_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Contexts in one file, clusters and users in another: kubectl merges them. The first file
    # to set current-context wins (kubernetes-asyncio alone would take the last one's), and a
    # name defined twice keeps its first definition.
    contexts = write_kubeconfig(
        tmp_path / "contexts", contexts={"first": "a", "second": "b"}, current="first"
    )
    clusters = write_kubeconfig(
        tmp_path / "clusters",
        clusters={"a": "https://a:6443", "b": "https://b:6443"},
        contexts={"first": "b"},
        users=("u",),
        current="second",
    )
    listed = [str(tmp_path / "missing"), str(contexts), "", str(clusters)]
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(listed))
    assert await connected_host(ClientSettings()) == "https://a:6443"
    assert await connected_host(ClientSettings(context="second")) == "https://b:6443"


async def test_env_listing_no_existing_file_falls_back_to_in_cluster_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")]))
    with pytest.raises(ApiError) as raised:
        await KubeClient.connect(ClientSettings())
    assert raised.value.reason == "NoConfig"


async def test_an_unusable_kubeconfig_is_an_api_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = write_kubeconfig(tmp_path / "broken", current="nowhere")
    monkeypatch.setenv("KUBECONFIG", str(broken))
    with pytest.raises(ApiError) as raised:
        await KubeClient.connect(ClientSettings())
    assert raised.value.reason == "BadKubeconfig"
    assert str(broken) in raised.value.message


def test_kubeconfig_files_order_and_expansion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    (home / ".kube" / "config").write_text("{}")
    other = tmp_path / "other"
    other.write_text("{}")
    monkeypatch.setenv("HOME", str(home))  # os.path.expanduser reads the process environment
    listed = ["~/.kube/config", str(other), str(other), "/nonexistent"]
    environ = {"KUBECONFIG": os.pathsep.join(listed)}
    assert kubeconfig_files("", environ) == (str(home / ".kube" / "config"), str(other))
    assert kubeconfig_files("/given", environ) == ("/given",)
    assert kubeconfig_files("", {}) == ()
    assert kubeconfig_files("", {"KUBECONFIG": ""}) == ()
