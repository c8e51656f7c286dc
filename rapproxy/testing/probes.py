"""Client probes that run inside a test namespace (via `Namespace.call`): small and picklable.

They are module-level functions because `Namespace.call` runs them in a worker process started
inside the namespace; each returns plain data or raises with a message saying what failed.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of one GET, with a fresh connection; error statuses are returned too."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:  # carries a socket: must not cross processes
        body = error.read().decode(errors="replace")
        error.close()
        return error.code, body


def backend_names(url: str, count: int, timeout: float = 3.0) -> list[str]:
    """The first body line of `count` GETs: which backend served each one."""
    names = []
    for _ in range(count):
        status, body = http_get(url, timeout)
        if status != 200:
            raise OSError(f"{url}: HTTP {status}: {body[:200]}")
        names.append(body.split("\n", 1)[0])
    return names


def concurrent_backend_names(url: str, clients: int, seconds: float) -> list[str]:
    """GETs from `clients` threads in a closed loop for `seconds`: who served each one.

    A bounded load (time and count): each thread stops at the deadline or after 10 000
    requests. Failed requests are recorded as "".
    """
    deadline = time.monotonic() + seconds
    names: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(10_000):
            if time.monotonic() >= deadline:
                return
            try:
                status, body = http_get(url, 3.0)
                name = body.split("\n", 1)[0] if status == 200 else ""
            except OSError:
                name = ""
            with lock:
                names.append(name)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return names


def udp_ask(
    host: str, port: int, payload: bytes, timeout: float = 3.0, source_port: int = 0
) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        if source_port:
            sock.bind(("0.0.0.0", source_port))
        sock.sendto(payload, (host, port))
        data, _ = sock.recvfrom(65535)
        return data


def wait_http(url: str, within: float = 15.0) -> int:
    """Poll until `url` answers 200; returns how many milliseconds that took."""
    started = time.monotonic()
    last_error = ""
    while time.monotonic() - started < within:
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return int((time.monotonic() - started) * 1000)
            last_error = f"status {status}"
        except OSError as error:
            last_error = repr(error)
        time.sleep(0.02)
    raise TimeoutError(f"{url} did not answer 200 within {within}s (last: {last_error})")
