"""The ServiceTable: one immutable snapshot of everything the data plane serves.

The sync runner builds a new table from the change trackers and swaps it in whole; readers on the
connection path only ever see a complete, consistent snapshot. The address index answers the one
question the relay asks of an intercepted connection — "which service port was this?" — in O(1).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from rapproxy.model.endpoints import Endpoint
from rapproxy.model.service import L4Protocol, ServicePort, ServicePortName


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    port: ServicePort
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Destination:
    """What an intercepted destination address resolves to."""

    name: ServicePortName
    external: bool  # reached through a NodePort, externalIP or LoadBalancer IP


@dataclass(frozen=True, slots=True)
class ServiceTable:
    entries: Mapping[ServicePortName, ServiceEntry] = field(default_factory=dict)
    _by_address: dict[tuple[L4Protocol, str, int], Destination] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_node_port: dict[tuple[L4Protocol, int], Destination] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name, entry in self.entries.items():
            port = entry.port
            for ip in port.cluster_ips:
                self._by_address[(port.protocol, ip, port.port)] = Destination(name, external=False)
            for ip in port.external_addresses:
                self._by_address[(port.protocol, ip, port.port)] = Destination(name, external=True)
            if port.node_port is not None:
                self._by_node_port[(port.protocol, port.node_port)] = Destination(
                    name, external=True
                )

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ServicePortName]:
        return iter(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def get(self, name: ServicePortName) -> ServiceEntry | None:
        return self.entries.get(name)

    def resolve(self, protocol: L4Protocol, ip: str, port: int) -> Destination | None:
        """The service port behind an intercepted original destination, if any.

        Exact addresses (ClusterIP, externalIP, LB IP) win; otherwise a NodePort match, since
        NodePort rules only redirect traffic addressed to one of this node's own addresses.
        """
        found = self._by_address.get((protocol, ip, port))
        if found is not None:
            return found
        return self._by_node_port.get((protocol, port))
