"""Cold-backup activation: the waiter inside a cold pod and the client that wakes it.

A cold pod's last init container runs `rapproxy bps-wait`: a tiny HTTP server that blocks the
pod's main containers until the controller sends `POST /activate` with the pod's token as a
Bearer credential. It answers 200, flushes the answer, and exits 0, so the kubelet starts the main
containers. Anything else (no token, wrong token) gets 401 and the waiter keeps waiting.

This replaces the original's raw TCP exchange, which flooded "ok" and waited for "bye" with an
exact match on a single recv(): correct only when the bytes happened to arrive in one segment.
HTTP frames the request; the token stops any pod on the network from waking a backup.

The client never raises for the expected failures: it returns an `ActivationResult` whose
outcome says what went wrong (refused, timed out, unauthorized), so the controller can decide to
replace the pod. It retries connection refusals until its deadline, because the waiter's
container being "running" in the pod status does not mean its socket is listening yet.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import hmac
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from rapproxy.model.bps import DEFAULT_ACTIVATION_PORT, ENV_ACTIVATION_TOKEN, ENV_POD_IP

ACTIVATE_PATH = "/activate"
HEALTHZ_PATH = "/healthz"
EXIT_ACTIVATED = 0
EXIT_TIMED_OUT = 1
EXIT_USAGE = 2
_RETRY_FIRST = 0.01
_RETRY_MAX = 0.2


class WaitTimedOut(TimeoutError):
    """The waiter's overall timeout passed without a valid activation."""


def new_activation_token() -> str:
    """A fresh per-pod token (256 bits, URL-safe, fits an annotation and a header)."""
    return secrets.token_urlsafe(32)


async def serve_until_activated(
    host: str,
    port: int,
    token: str,
    timeout: float | None = None,  # noqa: ASYNC109 - expiry is an outcome (WaitTimedOut), not a cancel
    *,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Serve /activate and /healthz on host:port; return once a valid activation was answered.

    `on_listening(host, port)` is called with the bound address (useful with port 0). Raises
    WaitTimedOut after `timeout` seconds without a valid activation (None: wait forever).
    """
    if not token:
        raise ValueError("bps-wait needs a non-empty token")
    expected = token.encode()
    activated = asyncio.Event()

    async def handle_activate(request: web.Request) -> web.StreamResponse:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), expected
        ):
            return web.json_response(
                {"error": "a valid Bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="bps-wait"'},
            )
        response = web.json_response({"activated": True})
        response.force_close()
        # Send the whole answer before stopping: the controller must see the 200, not a reset.
        await response.prepare(request)
        await response.write_eof()
        activated.set()
        return response

    async def handle_healthz(_: web.Request) -> web.StreamResponse:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=4096)
    app.router.add_post(ACTIVATE_PATH, handle_activate)
    app.router.add_get(HEALTHZ_PATH, handle_healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if on_listening is not None:
            bound = runner.addresses[0]
            on_listening(str(bound[0]), int(bound[1]))
        try:
            async with asyncio.timeout(timeout):
                await activated.wait()
        except TimeoutError:
            raise WaitTimedOut(f"not activated within {timeout:g}s") from None
    finally:
        await runner.cleanup()


def run_bps_wait(argv: Sequence[str]) -> int:
    """`rapproxy bps-wait`: exit 0 when activated, 1 on timeout, 2 on a usage error."""
    parser = argparse.ArgumentParser(
        prog="rapproxy bps-wait",
        description="Block a cold backup pod until the BackupPodSet controller activates it.",
    )
    parser.add_argument(
        "--host",
        default=os.environ.get(ENV_POD_IP) or "0.0.0.0",
        help=f"address to listen on (default: ${ENV_POD_IP}, else 0.0.0.0)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_ACTIVATION_PORT)
    parser.add_argument(
        "--token-file", help=f"file holding the token (default: ${ENV_ACTIVATION_TOKEN})"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="give up after this many seconds"
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code else EXIT_ACTIVATED
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as token_file:
                token = token_file.read().strip()
        except OSError as error:
            print(f"bps-wait: cannot read --token-file: {error}", file=sys.stderr)
            return EXIT_USAGE
    else:
        token = os.environ.get(ENV_ACTIVATION_TOKEN, "").strip()
    if not token:
        print(
            f"bps-wait: no token (empty --token-file or ${ENV_ACTIVATION_TOKEN})", file=sys.stderr
        )
        return EXIT_USAGE

    def announce(host: str, port: int) -> None:
        print(f"bps-wait: listening on {host}:{port}", flush=True)

    try:
        asyncio.run(
            serve_until_activated(args.host, args.port, token, args.timeout, on_listening=announce)
        )
    except WaitTimedOut as error:
        print(f"bps-wait: {error}", file=sys.stderr)
        return EXIT_TIMED_OUT
    except OSError as error:
        print(f"bps-wait: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return EXIT_USAGE
    print("bps-wait: activated", flush=True)
    return EXIT_ACTIVATED


class ActivationOutcome(enum.StrEnum):
    ACTIVATED = "activated"
    UNAUTHORIZED = "unauthorized"  # 401: wrong token; retrying cannot help
    REFUSED = "refused"  # nothing listened until the deadline
    TIMED_OUT = "timed-out"  # connected (or connecting) but no answer before the deadline
    UNEXPECTED = "unexpected"  # any other answer


@dataclass(frozen=True, slots=True)
class ActivationResult:
    outcome: ActivationOutcome
    detail: str
    elapsed: float  # seconds from the first attempt to the result
    attempts: int

    @property
    def ok(self) -> bool:
        return self.outcome is ActivationOutcome.ACTIVATED


def activation_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{ACTIVATE_PATH}"


async def activate(
    session: aiohttp.ClientSession,
    ip: str,
    port: int,
    token: str,
    timeout: float,  # noqa: ASYNC109 - bounds the retries too; expiry is a result, not an error
) -> ActivationResult:
    """Wake the waiter at ip:port; retry refusals with a short backoff until `timeout`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + timeout
    url = activation_url(ip, port)
    headers = {"Authorization": f"Bearer {token}"}
    attempts = 0
    delay = _RETRY_FIRST
    last_error = "no attempt made"

    def result(outcome: ActivationOutcome, detail: str) -> ActivationResult:
        return ActivationResult(outcome, detail, loop.time() - started, attempts)

    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return result(ActivationOutcome.REFUSED, f"{url}: {last_error}")
        attempts += 1
        try:
            async with session.post(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining)
            ) as response:
                body = await response.text()
        except TimeoutError:
            return result(ActivationOutcome.TIMED_OUT, f"{url}: no answer within {timeout:g}s")
        except (aiohttp.ClientConnectionError, OSError) as error:
            # Refused or reset: the waiter is not listening yet (or is restarting); try again.
            last_error = str(error) or type(error).__name__
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(delay * 2, _RETRY_MAX)
            continue
        if response.status == 200:
            return result(ActivationOutcome.ACTIVATED, "200")
        if response.status == 401:
            return result(ActivationOutcome.UNAUTHORIZED, f"{url}: 401 {body.strip()[:200]}")
        return result(
            ActivationOutcome.UNEXPECTED, f"{url}: {response.status} {body.strip()[:200]}"
        )
