"""Running the rendered transactions: `iptables-save` and `iptables-restore` as subprocesses.

`iptables-restore` stays a subprocess on purpose: it is iptables' transactional interface (one
commit for the whole text, on both backends), and re-implementing rule encoding over netlink for
two backends would trade a well-tested tool for a private one.

One `IptablesRunner` owns one address family's rules. It fails loudly: a non-zero exit raises
`IptablesError` carrying iptables' own stderr and, when iptables names it, the rejected line of
the transaction. A command that hangs (a stuck xtables lock) is killed after `timeout` seconds.

Startup repair needs no special mode: the first `sync` (with `repair_jumps=True`, the default)
declares rapproxy's chains — which creates or flushes them, so leftovers of a crashed run are
simply rewritten — and, from an `iptables-save` taken just before, fixes the jumps in the same
transaction. `cleanup` removes everything, including what older versions left.

Kernel-mode Services ride along in the same transaction. The runner remembers which kernel chains
it wrote, so the next sync deletes the ones no longer wanted without reading the table, and
whether POSTROUTING's jump is in place: a sync that needs it added or removed reads the table
and repairs, whatever the caller asked. `update_weights` rewrites only weighted chains, and
`update_kernel` only the chains of Services whose endpoints changed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence

from rapproxy.rules.backend import IptablesTools
from rapproxy.rules.kernel import KernelTarget, render_kernel_update, render_weight_update
from rapproxy.rules.render import (
    Family,
    RedirectTarget,
    RuleConfig,
    render_cleanup,
    render_jumps,
    render_sync,
)

_FAILED_LINE = re.compile(r"line:? (\d+) failed")


class IptablesError(RuntimeError):
    """An iptables command failed; `stderr` is its own explanation."""

    def __init__(
        self, argv: Sequence[str], returncode: int | None, stderr: str, failed_line: str | None
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.failed_line = failed_line
        status = "timed out" if returncode is None else f"exited {returncode}"
        message = f"{' '.join(self.argv)} {status}: {stderr.strip() or '(no stderr)'}"
        if failed_line is not None:
            message += f" [rejected line: {failed_line}]"
        super().__init__(message)


class IptablesRunner:
    """Applies rapproxy's nat rules for one address family with one iptables backend.

    `exec_prefix` runs every command through a wrapper — `("ip", "netns", "exec", NAME)` in the
    tests; empty on a node, where rapproxy runs in the host network namespace.
    """

    def __init__(
        self,
        tools: IptablesTools,
        *,
        exec_prefix: Sequence[str] = (),
        timeout: float = 60.0,
        lock_wait_seconds: int = 5,
    ) -> None:
        self._tools = tools
        self._prefix = tuple(exec_prefix)
        self._timeout = timeout
        self._lock_wait = lock_wait_seconds
        # The chains' text as last written by `sync`, so an unchanged sync costs a render and no
        # subprocess; forgotten whenever the kernel state may differ from it.
        self._last_rules: str | None = None
        # The kernel chains the last sync declared (deleted when no longer wanted), and whether
        # POSTROUTING jumps to ours (None: unknown, the next sync reads the table).
        self._kernel_chains: tuple[str, ...] = ()
        self._kernel_jump: bool | None = None

    @property
    def family(self) -> Family:
        return self._tools.family

    @property
    def tools(self) -> IptablesTools:
        return self._tools

    async def save(self) -> str:
        """The current nat table, as `iptables-save -t nat` prints it."""
        return await self._run((self._tools.save, "-t", "nat"), None)

    async def restore(self, text: str) -> None:
        """Apply one transaction with `--noflush` (other chains are left alone); "" is a no-op."""
        if not text:
            return
        argv = (self._tools.restore, "--noflush", f"--wait={self._lock_wait}")
        await self._run(argv, text)

    async def sync(
        self,
        targets: Sequence[RedirectTarget],
        config: RuleConfig,
        *,
        repair_jumps: bool = True,
        kernel: Sequence[KernelTarget] = (),
    ) -> bool:
        """Rewrite rapproxy's chains to exactly `targets` and `kernel`, in one transaction.

        With `repair_jumps` the nat table is read first, the jumps from PREROUTING/OUTPUT are
        repaired in the same transaction and the chains are always rewritten (do it at startup
        and on periodic full resyncs: it also undoes anyone else's edits to our chains).
        Without, nothing runs when the rendered chains equal what this runner wrote last;
        otherwise only the chains are rewritten. Returns whether iptables-restore ran.
        """
        # Rendering 10k services takes a few hundred milliseconds of pure Python; done on the
        # event loop it would stall every relayed connection, so it runs in a worker thread
        # (rendering is pure and the targets are immutable). A repairing sync renders once and
        # gets both texts: the transaction, and the chains alone for the next comparison.
        if (self._kernel_jump is not True) if kernel else (self._kernel_jump is True):
            # POSTROUTING's jump must be added or removed. (Unknown with no kernel Service:
            # a leftover jump is harmless until the next periodic full sync removes it.)
            repair_jumps = True
        saved = await self.save() if repair_jumps else None
        previous = self._kernel_chains

        def render() -> tuple[str, str, tuple[str, ...]]:
            rendered = render_sync(
                targets,
                config,
                self.family,
                saved_nat=saved,
                kernel=kernel,
                previous_chains=previous,
            )
            return rendered.rules, rendered.text, rendered.kernel_chains

        rules, text, chains = await asyncio.to_thread(render)
        if not repair_jumps and rules == self._last_rules:
            return False
        self._last_rules = None
        await self.restore(text)
        self._last_rules = rules
        self._kernel_chains = chains
        self._kernel_jump = bool(kernel)
        return True

    async def update_weights(self, kernel: Sequence[KernelTarget], config: RuleConfig) -> bool:
        """Rewrite only the weighted chains of `kernel` (whose endpoints the last sync wrote).

        One transaction; each chain is flushed and refilled inside it, so no Service is ever
        without a path. Returns whether iptables-restore ran.
        """
        # 10k chains render in about a second of pure Python: off the event loop, as `sync`.
        text = await asyncio.to_thread(render_weight_update, kernel, config.kernel, self.family)
        if not text:
            return False
        self._last_rules = None  # the kernel no longer holds what the last sync wrote
        await self.restore(text)
        return True

    async def update_kernel(
        self, changes: Sequence[tuple[KernelTarget, KernelTarget]], config: RuleConfig
    ) -> bool:
        """Rewrite only the chains of kernel-mode Services whose entry rules stay the same.

        `changes` are (written, wanted) pairs. One transaction; raises `KernelRenderError`
        (nothing written) when an entry rule would change. Returns whether iptables-restore ran.
        """
        update = await asyncio.to_thread(render_kernel_update, changes, config.kernel, self.family)
        if not update.text:
            return False
        self._last_rules = None  # the kernel no longer holds what the last sync wrote
        await self.restore(update.text)
        gone = set(update.deleted)
        kept = [chain for chain in self._kernel_chains if chain not in gone]
        known = set(kept)
        self._kernel_chains = (*kept, *(c for c in update.created if c not in known))
        return True

    async def ensure_jumps(self) -> bool:
        """Repair the jumps without touching live rules; True when something was repaired."""
        text = render_jumps(await self.save())
        await self.restore(text)
        return bool(text)

    async def cleanup(self) -> bool:
        """Remove every `RAPPROXY-*` chain and every jump into one; True when there was any."""
        self._last_rules = None
        self._kernel_chains = ()
        self._kernel_jump = None
        text = render_cleanup(await self.save())
        await self.restore(text)
        return bool(text)

    async def _run(self, command: Sequence[str], stdin_text: str | None) -> str:
        argv = (*self._prefix, *command)
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
            raise IptablesError(argv, None, f"no answer within {self._timeout} s", None) from None
        if process.returncode != 0:
            error_text = stderr.decode(errors="replace")
            raise IptablesError(
                argv, process.returncode, error_text, _failed_line(error_text, stdin_text)
            )
        return stdout.decode(errors="replace")


def _failed_line(stderr: str, text: str | None) -> str | None:
    match = _FAILED_LINE.search(stderr)
    if match is None or text is None:
        return None
    lines = text.splitlines()
    number = int(match.group(1))
    return lines[number - 1] if 0 < number <= len(lines) else None
