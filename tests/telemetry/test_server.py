"""The telemetry endpoint over real HTTP on loopback: allowlist, token, document."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from rapproxy.model.telemetry import NodeStats, PodStats, parse_peer_report
from rapproxy.telemetry.server import (
    TELEMETRY_PATH,
    TelemetryEndpoint,
    TokenError,
    TokenFile,
    telemetry_app,
)

from .conftest import TOKEN, Serve

HOST = "127.0.0.2"
SAMPLE = NodeStats("n1", 0.25, 0.5, 10.0, (PodStats("uid-1", 0.1, 0.2),))


def endpoint(
    token_file: TokenFile,
    is_node_ip: Callable[[str], bool],
    stats: NodeStats | None = SAMPLE,
) -> TelemetryEndpoint:
    return TelemetryEndpoint(
        lambda: stats,
        lambda: {"10.0.0.1:8080": 2},
        token_file.current,
        is_node_ip,
        clock=lambda: 10.5,
    )


async def get(
    port: int, token: str | None = TOKEN, source: str = "127.0.0.1"
) -> tuple[int, dict[str, object], aiohttp.typedefs.LooseHeaders]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(f"http://{HOST}:{port}{TELEMETRY_PATH}", headers=headers) as response,
    ):
        return response.status, await response.json(), response.headers


async def test_serves_figures_their_age_and_active_connections(
    serve: Serve, token_file: TokenFile, node_ips: Callable[[str], bool]
) -> None:
    async with serve(telemetry_app(endpoint(token_file, node_ips)), HOST) as (_, port):
        status, doc, _ = await get(port)
    assert status == 200
    assert doc["node"] == "n1" and doc["cpu"] == 0.25 and doc["memory"] == 0.5
    assert doc["age"] == pytest.approx(0.5)
    assert doc["activeConnections"] == {"10.0.0.1:8080": 2}
    assert parse_peer_report(doc, 100.0).stats.pods[0].uid == "uid-1"


@pytest.mark.parametrize(("token", "reason"), [(None, "missing"), ("wrong", "invalid")])
async def test_refuses_missing_or_bad_token_with_401(
    serve: Serve,
    token_file: TokenFile,
    node_ips: Callable[[str], bool],
    token: str | None,
    reason: str,
) -> None:
    handler = endpoint(token_file, node_ips)
    async with serve(telemetry_app(handler), HOST) as (_, port):
        status, doc, headers = await get(port, token=token)
    assert status == 401
    assert doc["error"] == "unauthorized" and reason in str(doc["reason"])
    assert headers["WWW-Authenticate"] == "Bearer"
    assert handler.refused[401] == 1


async def test_refuses_a_source_that_is_not_a_node_with_403(
    serve: Serve, token_file: TokenFile
) -> None:
    only_other_nodes = {"127.0.0.3"}.__contains__
    async with serve(telemetry_app(endpoint(token_file, only_other_nodes)), HOST) as (_, port):
        status, doc, _ = await get(port, source="127.0.0.1")
        assert status == 403
        assert doc["error"] == "forbidden" and "127.0.0.1" in str(doc["reason"])
        status, _, _ = await get(port, source="127.0.0.3")
        assert status == 200


async def test_answers_503_before_the_first_sample(
    serve: Serve, token_file: TokenFile, node_ips: Callable[[str], bool]
) -> None:
    async with serve(telemetry_app(endpoint(token_file, node_ips, stats=None)), HOST) as (_, p):
        status, doc, _ = await get(p)
    assert status == 503 and doc["error"] == "unavailable"


async def test_rotated_token_file_takes_effect(
    serve: Serve, tmp_path: Path, node_ips: Callable[[str], bool]
) -> None:
    path = tmp_path / "rotating"
    path.write_text("old-token")
    tokens = TokenFile(path)
    async with serve(telemetry_app(endpoint(tokens, node_ips)), HOST) as (_, port):
        assert (await get(port, token="old-token"))[0] == 200
        replacement = tmp_path / "new"
        replacement.write_text("new-token")
        replacement.replace(path)  # how a Secret update lands: a new file swapped in
        assert (await get(port, token="old-token"))[0] == 401
        assert (await get(port, token="new-token"))[0] == 200


def test_token_file_must_exist_and_not_be_empty(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="missing"):
        TokenFile(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(TokenError, match="empty"):
        TokenFile(empty)
