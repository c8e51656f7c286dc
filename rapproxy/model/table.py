"""The ServiceTable: one immutable snapshot of everything the data plane serves.

The sync runner builds a new table from the change trackers and swaps it in whole; readers on the
connection path only ever see a complete, consistent snapshot. The address index answers the one
question the relay asks of an intercepted connection — "which service port was this?" — in O(1).

`replaced()` derives the next table from this one in time proportional to the change (dict copies
are C-speed; only the changed entries are re-indexed), so a one-endpoint change in a 10k-Service
cluster does not re-index 10k services. If two service ports claim the same address (which the
API server prevents for ClusterIPs, but not for externalIPs), the latest claim wins and, when it
goes away, the earlier one answers again — the same whether the table was built whole or derived.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

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


AddressKey = tuple[L4Protocol, str, int]
NodePortKey = tuple[L4Protocol, int]
_K = TypeVar("_K", AddressKey, NodePortKey)


@dataclass(frozen=True, slots=True)
class ServiceTable:
    entries: Mapping[ServicePortName, ServiceEntry] = field(default_factory=dict)
    _by_address: dict[AddressKey, Destination] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _by_node_port: dict[NodePortKey, Destination] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # Keys claimed by more than one service port: every claimant, oldest first (normally empty).
    _contested: dict[AddressKey | NodePortKey, list[Destination]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name, entry in self.entries.items():
            self._index(name, entry)

    def replaced(
        self,
        removed: Iterable[ServicePortName],
        added: Mapping[ServicePortName, ServiceEntry],
    ) -> ServiceTable:
        """A new table: this one without `removed`, then with `added` (new or replacing entries).

        This table is left as it was: readers holding it keep a consistent snapshot.
        """
        table = ServiceTable.__new__(ServiceTable)
        entries = dict(self.entries)
        object.__setattr__(table, "entries", entries)
        object.__setattr__(table, "_by_address", dict(self._by_address))
        object.__setattr__(table, "_by_node_port", dict(self._by_node_port))
        object.__setattr__(
            table, "_contested", {key: list(v) for key, v in self._contested.items()}
        )
        for name in [*removed, *added]:
            entry = entries.pop(name, None)
            if entry is not None:
                table._unindex(name, entry)
        for name, entry in added.items():
            entries[name] = entry
            table._index(name, entry)
        return table

    def _index(self, name: ServicePortName, entry: ServiceEntry) -> None:
        port = entry.port
        for ip in port.cluster_ips:
            self._claim(self._by_address, (port.protocol, ip, port.port), Destination(name, False))
        for ip in port.external_addresses:
            self._claim(self._by_address, (port.protocol, ip, port.port), Destination(name, True))
        if port.node_port is not None:
            self._claim(
                self._by_node_port, (port.protocol, port.node_port), Destination(name, True)
            )

    def _unindex(self, name: ServicePortName, entry: ServiceEntry) -> None:
        port = entry.port
        for ip in (*port.cluster_ips, *port.external_addresses):
            self._release(self._by_address, (port.protocol, ip, port.port), name)
        if port.node_port is not None:
            self._release(self._by_node_port, (port.protocol, port.node_port), name)

    def _claim(self, index: dict[_K, Destination], key: _K, destination: Destination) -> None:
        claimants = self._contested.get(key)
        current = index.get(key)
        if claimants is not None:
            claimants[:] = [d for d in claimants if d.name != destination.name]
            claimants.append(destination)
        elif current is not None and current.name != destination.name:
            self._contested[key] = [current, destination]
        index[key] = destination

    def _release(self, index: dict[_K, Destination], key: _K, name: ServicePortName) -> None:
        claimants = self._contested.get(key)
        if claimants is None:
            if (current := index.get(key)) is not None and current.name == name:
                del index[key]
            return
        claimants[:] = [d for d in claimants if d.name != name]
        if claimants:
            index[key] = claimants[-1]
        else:
            index.pop(key, None)
        if len(claimants) <= 1:
            del self._contested[key]

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
