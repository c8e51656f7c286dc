"""Cold-backup activation on real loopback sockets: the waiter, its CLI process, the client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rapproxy.bps.activation import (
    ActivationOutcome,
    WaitTimedOut,
    activate,
    activation_url,
    new_activation_token,
    run_bps_wait,
    serve_until_activated,
)
from rapproxy.model.bps import ENV_ACTIVATION_TOKEN

TOKEN = "correct-horse"
DEADLINE = 10.0


class Waiter:
    """A waiter task on 127.0.0.1 with a kernel-chosen port."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        def on_listening(_: str, port: int) -> None:
            self.listening.set_result(port)

        self.task = asyncio.create_task(
            serve_until_activated("127.0.0.1", 0, TOKEN, self.timeout, on_listening=on_listening)
        )
        either: set[asyncio.Future[Any]] = {self.listening, self.task}
        done, _ = await asyncio.wait(either, timeout=DEADLINE, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        return self.listening.result()


@pytest.fixture
async def waiter() -> AsyncIterator[Waiter]:
    w = Waiter()
    try:
        yield w
    finally:
        if w.task is not None and not w.task.done():
            w.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w.task


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def refusing_port() -> Iterator[socket.socket]:
    """A port that is bound but not listening: the kernel refuses connections to it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


async def test_waiter_rejects_missing_and_wrong_tokens_and_keeps_waiting(
    waiter: Waiter, session: aiohttp.ClientSession
) -> None:
    port = await waiter.start()
    url = activation_url("127.0.0.1", port)
    async with session.post(url) as missing:
        assert missing.status == 401
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    async with session.post(url, headers={"Authorization": "Bearer wrong"}) as wrong:
        assert wrong.status == 401
    async with session.post(url, headers={"Authorization": f"Basic {TOKEN}"}) as basic:
        assert basic.status == 401
    async with session.get(f"http://127.0.0.1:{port}/healthz") as health:
        assert health.status == 200
    assert waiter.task is not None and not waiter.task.done()


async def test_waiter_answers_200_and_returns_on_a_valid_activation(
    waiter: Waiter, session: aiohttp.ClientSession
) -> None:
    port = await waiter.start()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.post(activation_url("127.0.0.1", port), headers=headers) as response:
        assert response.status == 200
        assert await response.json() == {"activated": True}
    assert waiter.task is not None
    await asyncio.wait_for(waiter.task, DEADLINE)
    # It stopped listening: the port refuses now.
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_waiter_times_out_without_activation() -> None:
    with pytest.raises(WaitTimedOut, match=r"within 0.2s"):
        await serve_until_activated("127.0.0.1", 0, TOKEN, 0.2)


async def test_waiter_refuses_an_empty_token() -> None:
    with pytest.raises(ValueError, match="non-empty token"):
        await serve_until_activated("127.0.0.1", 0, "")


async def test_client_activates_a_listening_waiter(
    waiter: Waiter, session: aiohttp.ClientSession
) -> None:
    port = await waiter.start()
    result = await activate(session, "127.0.0.1", port, TOKEN, timeout=DEADLINE)
    assert result.ok and result.outcome is ActivationOutcome.ACTIVATED
    assert result.attempts == 1
    assert 0 < result.elapsed < DEADLINE


async def test_client_reports_a_wrong_token_as_unauthorized_at_once(
    waiter: Waiter, session: aiohttp.ClientSession
) -> None:
    port = await waiter.start()
    result = await activate(session, "127.0.0.1", port, "nope", timeout=DEADLINE)
    assert result.outcome is ActivationOutcome.UNAUTHORIZED
    assert (result.attempts, result.ok) == (1, False)
    assert "401" in result.detail


async def test_client_reports_refused_when_nothing_listens_until_the_deadline(
    session: aiohttp.ClientSession, refusing_port: socket.socket
) -> None:
    port = refusing_port.getsockname()[1]
    result = await activate(session, "127.0.0.1", port, TOKEN, timeout=0.3)
    assert result.outcome is ActivationOutcome.REFUSED
    assert result.attempts > 1  # it retried
    assert 0.3 <= result.elapsed < 2.0


async def test_client_retries_until_the_waiter_starts_listening(
    refusing_port: socket.socket,
) -> None:
    port = refusing_port.getsockname()[1]
    refused = asyncio.Event()

    async def on_exception(*_: object) -> None:
        refused.set()

    trace = aiohttp.TraceConfig()
    trace.on_request_exception.append(on_exception)
    async with aiohttp.ClientSession(trace_configs=[trace]) as session:
        attempt = asyncio.create_task(activate(session, "127.0.0.1", port, TOKEN, DEADLINE))
        await asyncio.wait_for(refused.wait(), DEADLINE)  # the first try was refused
        refusing_port.close()
        serving = asyncio.create_task(serve_until_activated("127.0.0.1", port, TOKEN, DEADLINE))
        result = await asyncio.wait_for(attempt, DEADLINE)
        await asyncio.wait_for(serving, DEADLINE)
    assert result.ok
    assert result.attempts >= 2


async def test_client_times_out_on_a_peer_that_never_answers(
    session: aiohttp.ClientSession,
) -> None:
    release = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        await release.wait()  # a peer that reads the request and never answers
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        try:
            result = await activate(session, "127.0.0.1", port, TOKEN, timeout=0.3)
        finally:
            release.set()
    assert result.outcome is ActivationOutcome.TIMED_OUT
    assert result.elapsed < 2.0


async def test_client_reports_any_other_answer_as_unexpected(
    session: aiohttp.ClientSession,
) -> None:
    async def fail(_: web.Request) -> web.Response:
        return web.Response(status=503, text="busy")

    app = web.Application()
    app.router.add_post("/activate", fail)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        result = await activate(session, "127.0.0.1", port, TOKEN, timeout=DEADLINE)
    finally:
        await runner.cleanup()
    assert result.outcome is ActivationOutcome.UNEXPECTED
    assert "503 busy" in result.detail


def test_activation_urls_bracket_ipv6() -> None:
    assert activation_url("fd00::5", 9901) == "http://[fd00::5]:9901/activate"
    assert activation_url("10.0.0.5", 9901) == "http://10.0.0.5:9901/activate"


def test_tokens_are_fresh_and_long() -> None:
    tokens = {new_activation_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) >= 40 for t in tokens)


def test_cli_without_a_token_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_ACTIVATION_TOKEN, raising=False)
    assert run_bps_wait(["--host", "127.0.0.1", "--port", "0"]) == 2


def test_cli_with_an_unreadable_token_file_is_a_usage_error(tmp_path: Path) -> None:
    assert run_bps_wait(["--port", "0", "--token-file", str(tmp_path / "missing")]) == 2


WAIT_SCRIPT = (
    "import sys; from rapproxy.bps.activation import run_bps_wait; "
    "sys.exit(run_bps_wait(sys.argv[1:]))"
)


@contextlib.asynccontextmanager
async def bps_wait_process(
    *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[SimpleNamespace]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WAIT_SCRIPT,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), DEADLINE)).decode()
        assert line.startswith("bps-wait: listening on 127.0.0.1:"), line
        yield SimpleNamespace(proc=proc, port=int(line.rsplit(":", 1)[1]))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_waiter_process_exits_0_only_on_a_valid_activation(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    async with bps_wait_process("--token-file", str(token_file)) as waiting:
        wrong = await activate(session, "127.0.0.1", waiting.port, "wrong", DEADLINE)
        assert wrong.outcome is ActivationOutcome.UNAUTHORIZED
        assert waiting.proc.returncode is None
        right = await activate(session, "127.0.0.1", waiting.port, TOKEN, DEADLINE)
        assert right.ok
        assert await asyncio.wait_for(waiting.proc.wait(), DEADLINE) == 0
        out = await waiting.proc.stdout.read()
        assert b"bps-wait: activated" in out


async def test_the_waiter_process_reads_the_token_from_the_environment_and_times_out(
    session: aiohttp.ClientSession,
) -> None:
    env = {"PATH": "/usr/bin:/bin", ENV_ACTIVATION_TOKEN: TOKEN}
    async with bps_wait_process("--timeout", "0.5", env=env) as waiting:
        bad = await activate(session, "127.0.0.1", waiting.port, "x", DEADLINE)
        assert bad.outcome is ActivationOutcome.UNAUTHORIZED
        assert await asyncio.wait_for(waiting.proc.wait(), DEADLINE) == 1
        err = await waiting.proc.stderr.read()
        assert b"not activated within 0.5s" in err
