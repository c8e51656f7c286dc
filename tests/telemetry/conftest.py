"""Real telemetry servers on loopback addresses (127.0.0.0/8 is all loopback on Linux)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from rapproxy.telemetry.server import TokenFile

TOKEN = "s3cret-token"


Serve = Callable[[web.Application, str], AbstractAsyncContextManager[tuple[web.AppRunner, int]]]


@asynccontextmanager
async def _serve(app: web.Application, host: str) -> AsyncIterator[tuple[web.AppRunner, int]]:
    """Serve `app` on `host`, port from the kernel; always cleaned up."""
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        port = runner.addresses[0][1]
        yield runner, port
    finally:
        await runner.cleanup()


@pytest.fixture
def serve() -> Serve:
    return _serve


@pytest.fixture
def token_file(tmp_path: Path) -> TokenFile:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return TokenFile(path)


@pytest.fixture
def node_ips() -> Callable[[str], bool]:
    allowed = {f"127.0.0.{i}" for i in range(1, 10)}
    return allowed.__contains__
