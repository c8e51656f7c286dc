"""Forgetting the conntrack entries of UDP flows whose redirect target changed or went away.

REDIRECT is NAT, and NAT is decided once per flow: the first datagram of a UDP "flow" (client
address and port → ClusterIP:port) is redirected to the proxy socket of that moment and the
decision is stored in a conntrack entry, which every later datagram reuses and refreshes. A client
that keeps sending (DNS resolvers reuse their source port; a game or metrics client sends every
few seconds) therefore keeps its entry alive forever, and keeps hitting the OLD target after the
rules changed: a closed socket (ICMP port unreachable) or, worse, a port that now belongs to
another service. This is kube-proxy's long-running stale-UDP-conntrack problem; the fix is the
same as kube-proxy's: when a UDP service port's redirect target changes or disappears, delete
the entries whose ORIGINAL destination is that service address and port, so the next datagram
is NATed afresh by the current rules. For a NodePort the destination address is any node
address, so entries are matched by port alone (`dst_ip=None`).

Done over netlink with pyroute2's `AsyncConntrack` (dump filtered by the original tuple, then
delete each entry), as the design asks, which works on this kernel (see tests/netns). If the
netlink path itself fails (pyroute2 too old for ctnetlink on some host, a kernel without
ctnetlink filtering), the `conntrack` CLI from conntrack-tools does the same job
(`conntrack -D -p udp --orig-dst IP --orig-port-dst PORT`) — that is the documented fallback.
An entry that vanished between dump and delete is not an error.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import re
import shutil
import socket
from collections.abc import Sequence

from pyroute2.conntrack import AsyncConntrack, NFCTAttrTuple
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

_CLI_DELETED = re.compile(r"(\d+) flow entries have been deleted")
_CLI_TIMEOUT_SECONDS = 30.0


class ConntrackError(RuntimeError):
    """Neither netlink nor the `conntrack` CLI could delete the entries; names the flow."""


async def delete_udp_entries(dst_ip: str | None, dst_port: int, *, netns: str | None = None) -> int:
    """Delete UDP conntrack entries with original destination `dst_ip:dst_port`.

    `dst_ip=None` matches every destination address (NodePorts), in both families. Returns how
    many entries were deleted. `netns` names a network namespace to act in (tests); rapproxy on
    a node passes nothing and acts in its own namespace.
    """
    if not 0 < dst_port < 65536:
        raise ValueError(f"dst_port: {dst_port} is not a port")
    if dst_ip is not None:
        dst_ip = _canonical(dst_ip)  # netlink reports addresses in canonical text form
    families = (socket.AF_INET, socket.AF_INET6) if dst_ip is None else (_family_of(dst_ip),)
    try:
        counts = [await _delete_netlink(family, dst_ip, dst_port, netns) for family in families]
        return sum(counts)
    except (NetlinkError, OSError) as error:
        log.warning(
            "conntrack over netlink failed (%s); falling back to the conntrack CLI for udp %s:%d",
            error,
            dst_ip or "*",
            dst_port,
        )
        prefix = ("ip", "netns", "exec", netns) if netns else ()
        return await delete_udp_entries_cli(dst_ip, dst_port, exec_prefix=prefix)


async def delete_udp_entries_cli(
    dst_ip: str | None, dst_port: int, *, exec_prefix: Sequence[str] = ()
) -> int:
    """The fallback: the same deletion with the `conntrack` CLI. Returns the count it reports."""
    if shutil.which("conntrack") is None:
        raise ConntrackError(f"udp {dst_ip or '*'}:{dst_port}: conntrack CLI not installed")
    argv = [*exec_prefix, "conntrack", "-D", "-p", "udp", "--orig-port-dst", str(dst_port)]
    if dst_ip is not None:
        argv[len(exec_prefix) + 1 : len(exec_prefix) + 1] = [
            "-f",
            "ipv6" if _family_of(dst_ip) == socket.AF_INET6 else "ipv4",
            "--orig-dst",
            dst_ip,
        ]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), _CLI_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ConntrackError(f"udp {dst_ip or '*'}:{dst_port}: conntrack CLI hung") from None
    output = (stdout + stderr).decode(errors="replace")
    match = _CLI_DELETED.search(output)
    # conntrack exits 1 when nothing matched; that is success for us.
    if match is None:
        raise ConntrackError(f"udp {dst_ip or '*'}:{dst_port}: conntrack -D failed: {output}")
    return int(match.group(1))


async def _delete_netlink(family: int, dst_ip: str | None, dst_port: int, netns: str | None) -> int:
    # The kernel filters by protocol and port; the address is compared here, because pyroute2
    # 0.9's dump filter silently matches nothing for an IPv6 address.
    wanted = NFCTAttrTuple(family=family, proto=socket.IPPROTO_UDP, dport=dst_port)
    address = ipaddress.ip_address(dst_ip) if dst_ip is not None else None
    deleted = 0
    async with AsyncConntrack(nfgen_family=family, netns=netns) as ct:
        entries = [
            entry
            async for entry in await ct.dump_entries(tuple_orig=wanted)
            if address is None or ipaddress.ip_address(entry.tuple_orig.daddr) == address
        ]
        for entry in entries:
            try:
                await ct.delete(entry)
            except NetlinkError as error:
                if error.code != errno.ENOENT:
                    raise
                continue
            deleted += 1
    return deleted


def _canonical(ip: str) -> str:
    _family_of(ip)
    return str(ipaddress.ip_address(ip))


def _family_of(ip: str) -> int:
    try:
        version = ipaddress.ip_address(ip).version
    except ValueError:
        raise ValueError(f"dst_ip: {ip!r} is not an IP address") from None
    return socket.AF_INET6 if version == 6 else socket.AF_INET
