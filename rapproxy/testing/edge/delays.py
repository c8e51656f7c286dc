"""Who is where on the emulated WAN, and how long a packet takes between two places.

Pure: no I/O. The WAN forwarder (a separate process) and the cluster that configures it share
this model through a small JSON document, so the same code decides "which site sent this packet"
in the forwarder and in the tests.

A *site* is a node or a client namespace, owning a few IPv4 prefixes (its WAN link and, for a
node, its pod CIDR). Delays are one-way, per ordered pair of sites, in milliseconds; a pair that
is not listed has no added delay. Traffic inside one site never crosses the WAN, so a site's
delay to itself is not stored.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


class InvalidWanConfig(ValueError):
    """A WAN document or delay matrix is malformed; the message names the field."""


@dataclass(frozen=True, slots=True)
class Site:
    """A place on the WAN: a node or a client, and the IPv4 prefixes that live there."""

    name: str
    prefixes: tuple[ipaddress.IPv4Network, ...]

    @classmethod
    def of(cls, name: str, prefixes: Iterable[str]) -> Site:
        networks = []
        for text in prefixes:
            try:
                network = ipaddress.ip_network(text, strict=True)
            except ValueError as error:
                raise InvalidWanConfig(f"sites.{name}: {text!r}: {error}") from error
            if not isinstance(network, ipaddress.IPv4Network):
                raise InvalidWanConfig(f"sites.{name}: {text!r} is not IPv4")
            networks.append(network)
        return cls(name, tuple(networks))


@dataclass(frozen=True, slots=True)
class DelayMatrix:
    """One-way delays in milliseconds between ordered pairs of sites."""

    one_way_ms: Mapping[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for (source, destination), value in self.one_way_ms.items():
            if source == destination:
                raise InvalidWanConfig(f"delays.{source}.{destination}: a site has no WAN delay")
            if not math.isfinite(value) or value < 0:
                raise InvalidWanConfig(f"delays.{source}.{destination}: {value!r} is not >= 0")

    @classmethod
    def symmetric(cls, pairs: Mapping[tuple[str, str], float]) -> DelayMatrix:
        """The same one-way delay in both directions of each listed pair."""
        both: dict[tuple[str, str], float] = {}
        for (a, b), value in pairs.items():
            both[(a, b)] = value
            both[(b, a)] = value
        return cls(both)

    @classmethod
    def uniform(cls, sites: Iterable[str], one_way_ms: float) -> DelayMatrix:
        """Every pair of distinct sites `one_way_ms` apart."""
        names = list(sites)
        return cls({(a, b): one_way_ms for a in names for b in names if a != b})

    def delay_ms(self, source: str, destination: str) -> float:
        if source == destination:
            return 0.0
        return self.one_way_ms.get((source, destination), 0.0)

    def scaled(self, factor: float) -> DelayMatrix:
        return DelayMatrix({pair: value * factor for pair, value in self.one_way_ms.items()})

    def merged(self, other: DelayMatrix) -> DelayMatrix:
        """These delays, with `other`'s pairs replacing the same pairs here."""
        return DelayMatrix({**self.one_way_ms, **other.one_way_ms})

    def to_json(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for (source, destination), value in sorted(self.one_way_ms.items()):
            out.setdefault(source, {})[destination] = value
        return out

    @classmethod
    def from_json(cls, document: Any) -> DelayMatrix:
        if not isinstance(document, dict):
            raise InvalidWanConfig("delays_ms: expected an object of objects")
        pairs: dict[tuple[str, str], float] = {}
        for source, row in document.items():
            if not isinstance(row, dict):
                raise InvalidWanConfig(f"delays_ms.{source}: expected an object")
            for destination, value in row.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise InvalidWanConfig(f"delays_ms.{source}.{destination}: not a number")
                pairs[(str(source), str(destination))] = float(value)
        return cls(pairs)


@dataclass(frozen=True, slots=True)
class WanConfig:
    """Everything the forwarder needs: the sites and the delays between them."""

    sites: tuple[Site, ...] = ()
    delays: DelayMatrix = field(default_factory=DelayMatrix)

    def __post_init__(self) -> None:
        names = [site.name for site in self.sites]
        if len(set(names)) != len(names):
            raise InvalidWanConfig(f"sites: duplicate names in {names}")
        owned: list[tuple[ipaddress.IPv4Network, str]] = []
        for site in self.sites:
            for network in site.prefixes:
                for other, owner in owned:
                    if network.overlaps(other):
                        raise InvalidWanConfig(
                            f"sites.{site.name}: {network} overlaps {other} of {owner}"
                        )
                owned.append((network, site.name))
        known = set(names)
        for source, destination in self.delays.one_way_ms:
            for name in (source, destination):
                if name not in known:
                    raise InvalidWanConfig(f"delays_ms.{source}.{destination}: no site {name!r}")

    def with_site(self, site: Site) -> WanConfig:
        others = tuple(s for s in self.sites if s.name != site.name)
        return WanConfig((*others, site), self.delays)

    def with_delays(self, delays: DelayMatrix) -> WanConfig:
        return WanConfig(self.sites, delays)

    def to_json(self) -> dict[str, Any]:
        return {
            "sites": {site.name: [str(p) for p in site.prefixes] for site in self.sites},
            "delays_ms": self.delays.to_json(),
        }

    @classmethod
    def from_json(cls, document: Any) -> WanConfig:
        if not isinstance(document, dict):
            raise InvalidWanConfig("expected an object with sites and delays_ms")
        raw_sites = document.get("sites", {})
        if not isinstance(raw_sites, dict):
            raise InvalidWanConfig("sites: expected an object of prefix lists")
        sites = []
        for name, prefixes in raw_sites.items():
            if not isinstance(prefixes, list):
                raise InvalidWanConfig(f"sites.{name}: expected a list of prefixes")
            sites.append(Site.of(str(name), [str(p) for p in prefixes]))
        return cls(tuple(sites), DelayMatrix.from_json(document.get("delays_ms", {})))


class DelayLookup:
    """The forwarder's hot path: raw IPv4 header bytes → seconds to hold the packet.

    Decisions are cached per (source, destination) address pair, the raw 8 bytes at offset 12 of
    the header, so a steady flow costs one dict lookup per packet. The closed world has a few
    hundred addresses at most, so the cache stays small; a new config builds a new lookup.
    """

    def __init__(self, config: WanConfig) -> None:
        self.config = config
        self._sites = [(site.name, site.prefixes) for site in config.sites]
        self._cache: dict[bytes, float] = {}

    def site_of(self, address: bytes) -> str | None:
        ip = ipaddress.IPv4Address(address)
        for name, prefixes in self._sites:
            if any(ip in prefix for prefix in prefixes):
                return name
        return None

    def seconds(self, addresses: bytes) -> float:
        """One-way delay for a packet whose header bytes 12..20 are `addresses` (src + dst).

        0 for a pair without delay and for addresses outside every site.
        """
        cached = self._cache.get(addresses)
        if cached is not None:
            return cached
        source = self.site_of(addresses[:4])
        destination = self.site_of(addresses[4:8])
        delay = 0.0
        if source is not None and destination is not None:
            delay = self.config.delays.delay_ms(source, destination) / 1000.0
        self._cache[bytes(addresses)] = delay
        return delay
