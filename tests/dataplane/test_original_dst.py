"""SO_ORIGINAL_DST: parsing the kernel's sockaddr, and a real REDIRECT inside a throwaway netns."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rapproxy.dataplane.original_dst import (
    NoOriginalDestination,
    original_destination,
    parse_sockaddr_in,
    parse_sockaddr_in6,
)


def test_parses_sockaddr_in() -> None:
    raw = socket.AF_INET.to_bytes(2, "little") + (80).to_bytes(2, "big") + bytes([10, 96, 0, 10])
    assert parse_sockaddr_in(raw + bytes(8)) == ("10.96.0.10", 80)


def test_parses_sockaddr_in6() -> None:
    address = socket.inet_pton(socket.AF_INET6, "fd00:10:96::a")
    raw = socket.AF_INET6.to_bytes(2, "little") + (8443).to_bytes(2, "big") + bytes(4) + address
    assert parse_sockaddr_in6(raw + bytes(4)) == ("fd00:10:96::a", 8443)


def test_short_sockaddr_is_rejected() -> None:
    with pytest.raises(ValueError, match="sockaddr_in"):
        parse_sockaddr_in(b"\x02\x00")


def test_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            with accepted, pytest.raises(NoOriginalDestination):
                original_destination(accepted)


PROBE = textwrap.dedent(
    """
    import socket, sys
    from rapproxy.dataplane.original_dst import original_destination

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1])))
    listener.listen(1)
    client = socket.create_connection(("10.96.0.10", 80), timeout=5)
    accepted, _ = listener.accept()
    ip, port = original_destination(accepted)
    print(f"{ip}:{port}")
    """
)


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("ROOT REQUIRED: needs a network namespace and iptables")
    if shutil.which("iptables") is None or shutil.which("ip") is None:
        pytest.fail("iptables and iproute2 must be installed for this test")
    name = f"rapdp-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@pytest.mark.root
def test_redirected_connection_reports_the_clusterip_it_was_sent_to(
    netns: str, tmp_path: Path
) -> None:
    proxy_port = 15001

    def in_ns(*argv: str) -> None:
        subprocess.run(["ip", "netns", "exec", netns, *argv], check=True)

    in_ns("ip", "link", "set", "lo", "up")
    # Without a route the connect fails with ENETUNREACH before nat OUTPUT runs.
    in_ns("ip", "route", "add", "local", "10.96.0.0/16", "dev", "lo")
    in_ns(
        "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", "10.96.0.10",
        "--dport", "80", "-j", "REDIRECT", "--to-ports", str(proxy_port),
    )  # fmt: skip
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    result = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, str(script), str(proxy_port)],
        check=True,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.strip() == "10.96.0.10:80"
