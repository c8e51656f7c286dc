"""Running kernel mode's nftables transactions: `nft -f -` as a subprocess, one runner per family.

`nft -f` is nftables' transactional interface, as `iptables-restore` is iptables': the whole text
is one commit, so the kernel sees a Service's old objects or its new ones, never a Service
without a path. One `NftRunner` owns one family's table (`ip rapproxy` or `ip6 rapproxy`, see
rules/nftables.py) and remembers the kernel-mode targets it wrote, so a sync writes only the
service ports that changed, and a weight write only the weighted chains.

How it fails: a non-zero exit raises `NftError` carrying nft's own messages and the line numbers
it names. One broken service port must not keep the others out of the kernel (iptables' runner
fails the whole transaction, which is right there: its text is one rewrite of shared chains),
so here every service port is a group of its own and a failed transaction is retried without
the groups nft's messages point at; those are reported as failed, with nft's message, and the
kernel keeps what it had for them. A failure nft does not attribute to a line is narrowed down by
halving. Only the table's own objects failing, or the first write (which replaces the table),
fails the call. A command that hangs is killed after `timeout` seconds; then, and after any
failure not attributed to a service port, the runner no longer knows what the kernel holds and
its next sync replaces the whole table.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from rapproxy.model.service import ServicePortName
from rapproxy.rules.kernel import KernelConfig, KernelTarget, NodeSplit
from rapproxy.rules.nftables import (
    SERVICES_CHAIN,
    NftGroup,
    join_groups,
    render_base,
    render_change,
    render_cleanup,
    render_port,
    render_rebuild,
    render_split_change,
    render_weights,
    table_ref,
)
from rapproxy.rules.render import Family, RuleConfig

_ERROR_LINE = re.compile(r"^(?:/dev/stdin|-):(\d+):[\d-]+: Error: (.*)$", re.M)
_MAX_MESSAGE = 2000
_FAMILY_WORD = {4: "ip", 6: "ip6"}


class NftError(RuntimeError):
    """An nft command failed; `stderr` is its own explanation, `errors` its messages by line."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.errors: dict[int, str] = {}
        for match in _ERROR_LINE.finditer(stderr):
            self.errors.setdefault(int(match.group(1)), match.group(2).strip())
        status = "timed out" if returncode is None else f"exited {returncode}"
        text = stderr.strip()[:_MAX_MESSAGE] or "(no stderr)"
        super().__init__(f"{' '.join(self.argv)} {status}: {text}")


@dataclass(frozen=True, slots=True)
class NftWriteResult:
    """What a write did: whether nft ran, and the service ports left out (nft's message each)."""

    ran: bool = False
    failed: Mapping[ServicePortName, str] = field(default_factory=dict)


class NftRunner:
    """Applies kernel-mode Services to one family's nft table.

    `exec_prefix` runs every command through a wrapper — `("ip", "netns", "exec", NAME)` in the
    tests; empty on a node.
    """

    def __init__(
        self,
        family: Family,
        *,
        exec_prefix: Sequence[str] = (),
        timeout: float = 60.0,
        command: str = "nft",
    ) -> None:
        self._family: Family = family
        self._prefix = tuple(exec_prefix)
        self._timeout = timeout
        self._command = command
        # What the kernel holds, per service port; None: unknown, the next sync rebuilds.
        self._written: dict[ServicePortName, KernelTarget] | None = None
        self._base: NftGroup | None = None
        self._splits: dict[str, NodeSplit] = {}  # the node splits the kernel holds, by key
        self._split_refs: Counter[str] = Counter()  # written service ports naming each

    @property
    def family(self) -> Family:
        return self._family

    @property
    def written(self) -> Mapping[ServicePortName, KernelTarget]:
        """The targets the kernel holds (empty before the first write)."""
        return dict(self._written or {})

    @property
    def splits(self) -> Mapping[str, NodeSplit]:
        """The node splits the kernel holds, by key."""
        return dict(self._splits)

    @property
    def needs_rebuild(self) -> bool:
        """Whether the next sync replaces the table (so it needs every target, not a few)."""
        return self._written is None

    async def sync(
        self,
        kernel: Sequence[KernelTarget],
        config: RuleConfig,
        *,
        splits: Mapping[str, NodeSplit] | None = None,
        remove: bool = True,
        verify: bool = False,
        only: Collection[ServicePortName] | None = None,
    ) -> NftWriteResult:
        """Bring the table to `kernel`: only the service ports that differ are written.

        `splits` are the node splits the targets name (`KernelTarget.split`): those new or
        changed are written first, in the same transaction, and a split no written Service
        names any more is deleted after. `remove=False` keeps the service ports written
        earlier and no longer in `kernel` (a switch to userspace mode removes them only once
        the redirect is in place). `verify` first checks that the table is still there
        (someone may have flushed the ruleset) and rebuilds it if not; do it on the periodic
        full sync.

        `only`: the caller knows which service ports may have changed; `kernel` holds the
        wanted ones among them, a name in `only` but not in `kernel` is removed (with
        `remove`), and the rest are not looked at: at 10k Services, comparing every target on
        every sync cost more than the nft run. Refused (ValueError) when the table is to be
        rebuilt (`needs_rebuild`), which needs them all.
        """
        wanted = {target.service_port.name: target for target in kernel}
        splits = splits or {}
        base = render_base(config.kernel, self._family, config.node_port_cidrs)
        if verify:
            await self.verify()
        if self._written is None:
            if only is not None:
                raise ValueError("the table is to be rebuilt: sync every target, not a few")
            return await self._rebuild(wanted, base, config, splits)
        written = self._written
        groups: list[NftGroup] = []
        if base != self._base:
            groups.append(base)
        split_groups, written_splits = self._split_changes(wanted.values(), splits, config.kernel)
        groups.extend(split_groups)
        changed: list[ServicePortName] = []
        pairs: list[tuple[KernelTarget | None, KernelTarget | None]] = []
        if only is not None:
            names = [name for name in only if remove or name in wanted]
        else:
            names = list(wanted)
            if remove:
                names.extend(name for name in written if name not in wanted)
        for name in names:
            old, new = written.get(name), wanted.get(name)
            if old is new or old == new:
                continue
            pairs.append((old, new))
            changed.append(name)

        def render() -> list[NftGroup]:
            out = []
            for old, new in pairs:
                before = render_port(old, config.kernel, self._family) if old else None
                after = render_port(new, config.kernel, self._family) if new else None
                group = render_change(before, after, self._family)
                if group is not None:
                    out.append(group)
            return out

        # A sync usually changes a port or two; the first ones after a start, thousands.
        groups.extend(await asyncio.to_thread(render) if len(pairs) > 50 else render())
        if not groups:
            for name in changed:  # nothing to write in this family, but now the wanted state
                self._record(name, wanted.get(name))
            await self._drop_unused_splits(config.kernel)
            return NftWriteResult()
        failed = await self._apply(groups)
        self._base = base
        self._splits.update(written_splits)
        for name in changed:
            if name not in failed:
                self._record(name, wanted.get(name))
        await self._drop_unused_splits(config.kernel)
        return NftWriteResult(True, failed)

    async def update_splits(self, splits: Sequence[NodeSplit], config: RuleConfig) -> bool:
        """Rewrite the node splits among `splits` that the kernel holds and that differ, in one
        transaction (each chain flushed and refilled inside it). True when nft ran.

        A split not written yet is left to the sync that writes its first Service. A failure
        raises `NftError`, and the next sync rebuilds the table (a split is the table's).
        """
        if self._written is None:
            return False
        groups: list[NftGroup] = []
        for split in splits:
            held = self._splits.get(split.key)
            if held is None or held == split:
                continue
            group = render_split_change(held, split, config.kernel, self._family)
            if group is not None:
                groups.append(group)
        if not groups:
            return False
        await self._apply(groups)
        for split in splits:
            if split.key in self._splits:
                self._splits[split.key] = split
        return True

    async def update_weights(
        self, kernel: Sequence[KernelTarget], config: RuleConfig
    ) -> NftWriteResult:
        """Rewrite only the weighted chains of `kernel`, whose endpoints must be those written.

        One transaction; each chain is flushed and refilled inside it, so no Service is ever
        without a path.
        """
        written = self._written
        if written is None:
            return NftWriteResult()

        def render() -> list[NftGroup]:
            groups = []
            for target in kernel:
                group = render_weights(target, config.kernel, self._family)
                if group is not None and target.service_port.name in written:
                    groups.append(group)
            return groups

        # Pure and on immutable targets: rendered off the event loop, as IptablesRunner does.
        groups = await asyncio.to_thread(render)
        if not groups:
            return NftWriteResult()
        failed = await self._apply(groups)
        for target in kernel:
            name = target.service_port.name
            if name in written and name not in failed:
                written[name] = target
        return NftWriteResult(True, failed)

    async def cleanup(self) -> bool:
        """Remove the table, whatever is in it; True when it was there."""
        present = await self._table_present()
        self._written = None
        self._base = None
        self._splits = {}
        self._split_refs = Counter()
        if present:
            await self._run(render_cleanup(self._family))
        return present

    # -- internals ------------------------------------------------------------------------------

    def _record(self, name: ServicePortName, target: KernelTarget | None) -> None:
        assert self._written is not None
        old = self._written.pop(name, None) if target is None else self._written.get(name)
        if target is not None:
            self._written[name] = target
        if old is not None and old.split is not None:
            self._split_refs[old.split.key] -= 1
        if target is not None and target.split is not None:
            self._split_refs[target.split.key] += 1

    def _split_changes(
        self,
        targets: Iterable[KernelTarget],
        splits: Mapping[str, NodeSplit],
        config: KernelConfig,
    ) -> tuple[list[NftGroup], dict[str, NodeSplit]]:
        """Groups writing the splits `targets` name that the kernel lacks or holds otherwise."""
        groups: list[NftGroup] = []
        written: dict[str, NodeSplit] = {}
        for key in sorted(_named(targets)):
            split = splits.get(key)
            if split is None:  # the Service's group fails on its jump, by name
                continue
            group = render_split_change(self._splits.get(key), split, config, self._family)
            if group is not None:
                groups.append(group)
                written[key] = split
        return groups, written

    async def _drop_unused_splits(self, config: KernelConfig) -> None:
        """Delete the split chains no written Service jumps to any more."""
        if self._written is None:
            return
        unused = {key for key in self._splits if self._split_refs[key] <= 0}
        if not unused:
            return
        groups = [
            group
            for key in sorted(unused)
            if (group := render_split_change(self._splits[key], None, config, self._family))
        ]
        await self._apply(groups)
        for key in unused:
            del self._splits[key]
            del self._split_refs[key]

    async def _rebuild(
        self,
        wanted: dict[ServicePortName, KernelTarget],
        base: NftGroup,
        config: RuleConfig,
        splits: Mapping[str, NodeSplit],
    ) -> NftWriteResult:
        named = {key: splits[key] for key in sorted(_named(wanted.values())) if key in splits}

        def render() -> list[NftGroup]:
            ports = [render_port(t, config.kernel, self._family) for t in wanted.values()]
            return render_rebuild(base, ports, self._family, named.values(), config.kernel)

        groups = await asyncio.to_thread(render)  # 10k ports: most of a second of pure Python
        self._splits = {}
        failed = await self._apply(groups)
        self._written = {name: t for name, t in wanted.items() if name not in failed}
        self._split_refs = Counter(
            t.split.key for t in self._written.values() if t.split is not None
        )
        self._splits = named
        self._base = base
        return NftWriteResult(True, failed)

    async def _apply(self, groups: Sequence[NftGroup]) -> dict[ServicePortName, str]:
        """Run `groups` as one transaction; leave out the service ports nft refuses."""
        failed: dict[ServicePortName, str] = {}
        pending = list(groups)
        while pending:
            text, spans = join_groups(pending)
            try:
                await self._run(text)
            except NftError as error:
                lines = text.splitlines()
                culprits = {
                    index
                    for index, span in enumerate(spans)
                    if any(number in span for number in error.errors)
                }
                if any(pending[i].owner is None for i in culprits) or error.returncode is None:
                    self._written = None
                    raise
                if not culprits:
                    return {**failed, **await self._narrow(pending, error)}
                for index in culprits:
                    owner = pending[index].owner
                    assert owner is not None
                    number = next(n for n in error.errors if n in spans[index])
                    failed[owner] = f"{error.errors[number]} [line: {lines[number - 1][:300]}]"
                pending = [g for i, g in enumerate(pending) if i not in culprits]
            else:
                return failed
        return failed

    async def _narrow(
        self, groups: Sequence[NftGroup], error: NftError
    ) -> dict[ServicePortName, str]:
        """nft named no line: halve until the failing service ports are alone."""
        owned = [g for g in groups if g.owner is not None]
        if len(owned) != len(groups):  # the table's own objects in the lot: not a port's fault
            self._written = None
            raise error
        if len(owned) == 1:
            owner = owned[0].owner
            assert owner is not None
            return {owner: str(error)}
        middle = len(owned) // 2
        failed: dict[ServicePortName, str] = {}
        for half in (owned[:middle], owned[middle:]):
            failed.update(await self._apply(half))
        return failed

    async def verify(self) -> bool:
        """Check that the table is still there; if not, the next sync rebuilds it (and needs
        every target). True when it is there."""
        if self._written is None:
            return False
        present = await self._table_present()
        if not present:
            self._written = None
        return present

    async def _table_present(self) -> bool:
        """Whether our table is still there (a flushed ruleset takes it).

        Asked as a transaction nft checks and never commits (`-c`): declaring a chain of the
        table fails when the table is gone. Any `list` command made nft 1.0.6 fetch every
        rule of the namespace first: 0.6-1.5 s at 10k Services, on every periodic full sync,
        which every change arriving meanwhile waited for."""
        probe = f"add chain {table_ref(self._family)} {SERVICES_CHAIN}\n"
        try:
            await self._run(probe, ("-c", "-f", "-"))
        except NftError as error:
            # Only "no such table" means gone: anything else (a timeout, a busy kernel) must
            # not cost a 30-s rebuild of 10k Services; it fails this sync, which is retried.
            if error.returncode is None or "No such file or directory" not in error.stderr:
                raise
            return False
        return True

    async def _run(self, stdin_text: str | None, args: Sequence[str] = ("-f", "-")) -> str:
        argv = (*self._prefix, self._command, *args)
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin_text is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        data = stdin_text.encode() if stdin_text is not None else None
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(data), self._timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise NftError(argv, None, f"no answer within {self._timeout} s") from None
        if process.returncode != 0:
            raise NftError(argv, process.returncode, stderr.decode(errors="replace"))
        return stdout.decode(errors="replace")


def _named(targets: Iterable[KernelTarget]) -> set[str]:
    """The keys of the node splits `targets` jump to."""
    return {t.split.key for t in targets if t.split is not None}
