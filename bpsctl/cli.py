"""The `bpsctl` command: status, describe and a deliberate failover for BackupPodSets.

A thin shell: it reads objects through `KubeClient` (the same door the daemon uses, with the same
kubeconfig handling as kubectl: `--kubeconfig`, `$KUBECONFIG`, `~/.kube/config`, then in-cluster;
`--context`; the context's namespace unless `-n`/`-A`), and hands them to `bpsctl.render`, which
is pure. Anything a user can cause — an unreachable API server, a missing set, a missing CRD, a
bad kubeconfig — is one line on stderr and a non-zero exit, never a traceback.

Exit status: 0 success, 1 the operation failed (not found, unreachable, timed out), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

from bpsctl import render
from rapproxy.cluster.client import (
    BACKUP_POD_SETS,
    EVENTS,
    PODS,
    ApiError,
    ClientSettings,
    Expired,
    KubeClient,
    NotFound,
    Resource,
    Unavailable,
)

EXIT_FAILED = 1
EXIT_USAGE = 2
LABEL_BPS = "rapproxy.io/bps"
CRD_NAME = "backuppodsets.rapproxy.io"
Obj = dict[str, Any]


class BpsctlError(Exception):
    """A failure to report as one line; `str()` is the message."""


# -- connection ------------------------------------------------------------------------------


def kubeconfig_path(flag: str | None) -> str:
    """kubectl's order: the flag, the first existing file of $KUBECONFIG, ~/.kube/config."""
    if flag:
        if not Path(flag).exists():
            raise BpsctlError(f"kubeconfig {flag} does not exist")
        return flag
    for candidate in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if candidate and Path(candidate).exists():
            return candidate
    default = Path.home() / ".kube" / "config"
    return str(default) if default.exists() else ""


def context_namespace(kubeconfig: str, context: str | None) -> str:
    """The namespace of the chosen (or current) context, as kubectl defaults it."""
    if not kubeconfig:
        try:
            return (
                Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
                or "default"
            )
        except OSError:
            return "default"
    try:
        config = yaml.safe_load(Path(kubeconfig).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise BpsctlError(f"cannot read kubeconfig {kubeconfig}: {error}") from None
    wanted = context or config.get("current-context")
    for entry in config.get("contexts") or []:
        if isinstance(entry, dict) and entry.get("name") == wanted:
            return str((entry.get("context") or {}).get("namespace") or "default")
    if context:
        raise BpsctlError(f'context "{context}" does not exist in {kubeconfig}')
    return "default"


async def connect(kubeconfig: str, context: str | None, timeout: float) -> KubeClient:  # noqa: ASYNC109
    try:
        return await KubeClient.connect(ClientSettings(kubeconfig, context or "", timeout))
    except ApiError as error:
        raise BpsctlError(error.message) from None
    except Exception as error:  # kubernetes-asyncio raises ConfigException and friends
        raise BpsctlError(
            f"cannot load kubeconfig {kubeconfig or '(in-cluster)'}: {error}"
        ) from None


# -- reading -----------------------------------------------------------------------------------


async def list_sets(client: KubeClient, namespace: str | None) -> tuple[list[Obj], str]:
    try:
        page = await client.list(BACKUP_POD_SETS, namespace)
    except NotFound:
        raise BpsctlError(
            f"the BackupPodSet API is not served: is the CRD {CRD_NAME} installed?"
        ) from None
    items = [i for i in page.get("items") or [] if isinstance(i, dict)]
    return items, str((page.get("metadata") or {}).get("resourceVersion") or "")


async def get_set(client: KubeClient, namespace: str, name: str) -> Obj:
    try:
        return await client.get(BACKUP_POD_SETS, name, namespace)
    except NotFound:
        # Tell a missing set from a missing CRD: the list fails only for the latter.
        await list_sets(client, namespace)
        raise BpsctlError(f'backuppodset "{name}" not found in namespace "{namespace}"') from None


async def pods_of(client: KubeClient, namespace: str, name: str) -> tuple[list[Obj], str]:
    page = await client.list(PODS, namespace, label_selector=f"{LABEL_BPS}={name}")
    items = [i for i in page.get("items") or [] if isinstance(i, dict)]
    return items, str((page.get("metadata") or {}).get("resourceVersion") or "")


async def events_of(client: KubeClient, bps: Obj) -> list[Obj]:
    meta = bps.get("metadata") or {}
    try:
        page = await client.list(EVENTS, meta.get("namespace"))
    except ApiError:
        return []  # events are a courtesy; a user without list on events still gets the rest
    return [
        e
        for e in page.get("items") or []
        if isinstance(e, dict) and (e.get("involvedObject") or {}).get("uid") == meta.get("uid")
    ]


def dump(value: Any, output: str, out: TextIO) -> None:
    if output == "json":
        out.write(json.dumps(value, indent=2, sort_keys=False) + "\n")
    else:
        out.write(yaml.safe_dump(value, sort_keys=False, default_flow_style=False))


# -- commands ----------------------------------------------------------------------------------


async def render_status(client: KubeClient, args: argparse.Namespace) -> tuple[str, list[str]]:
    """The text for `status` and the list versions to watch from for the next change."""
    now = time.time()
    wide = args.output == "wide"
    if args.name:
        bps = await get_set(client, args.namespace, args.name)
        pods, pods_version = await pods_of(client, args.namespace, args.name)
        _, sets_version = await list_sets(client, args.namespace)
        if args.output in ("json", "yaml"):
            return _dumped({"backupPodSet": bps, "pods": pods}, args.output), [
                sets_version,
                pods_version,
            ]
        text = render.set_summary(bps, now) + render.pods_table(pods, now, wide=wide)
        return text, [sets_version, pods_version]
    namespace = None if args.all_namespaces else args.namespace
    sets, version = await list_sets(client, namespace)
    if args.output in ("json", "yaml"):
        return _dumped({"apiVersion": "v1", "kind": "List", "items": sets}, args.output), [version]
    if not sets:
        where = "any namespace" if namespace is None else f'namespace "{namespace}"'
        return f"No BackupPodSets found in {where}.\n", [version]
    return render.status_table(sets, now, all_namespaces=args.all_namespaces, wide=wide), [version]


def _dumped(value: Any, output: str) -> str:
    if output == "json":
        return json.dumps(value, indent=2) + "\n"
    return str(yaml.safe_dump(value, sort_keys=False))


async def cmd_status(client: KubeClient, args: argparse.Namespace, out: TextIO) -> int:
    text, versions = await render_status(client, args)
    out.write(text)
    if not args.watch:
        return 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + args.watch_timeout if args.watch_timeout else None
    clear = out.isatty()
    while deadline is None or loop.time() < deadline:
        remaining = None if deadline is None else deadline - loop.time()
        changed = await wait_for_change(client, args, versions, remaining)
        if not changed:
            break
        text, versions = await render_status(client, args)
        if clear:
            out.write("\x1b[H\x1b[2J")
        else:
            out.write(f"\n--- {time.strftime('%H:%M:%S')} ---\n")
        out.write(text)
        out.flush()
    return 0


async def wait_for_change(
    client: KubeClient,
    args: argparse.Namespace,
    versions: Sequence[str],
    within: float | None,
) -> bool:
    """Block until a BackupPodSet (or, for one set, one of its pods) changes; False on timeout."""
    namespace = None if args.all_namespaces and not args.name else args.namespace
    watches: list[tuple[Resource, str | None, str | None, str]] = [
        (BACKUP_POD_SETS, namespace, None, versions[0])
    ]
    if args.name and len(versions) > 1:
        watches.append((PODS, args.namespace, f"{LABEL_BPS}={args.name}", versions[1]))

    async def one(resource: Resource, ns: str | None, selector: str | None, version: str) -> None:
        while True:
            try:
                async for event in client.watch(
                    resource, version, ns, label_selector=selector, timeout_seconds=60
                ):
                    if event.get("type") == "BOOKMARK":
                        continue
                    if args.name and resource is BACKUP_POD_SETS:
                        name = (event["object"].get("metadata") or {}).get("name")
                        if name != args.name:
                            continue
                    return
            except Expired:
                return  # re-list: something may have changed while we were not looking
            except Unavailable:
                await asyncio.sleep(1.0)  # the API went away; keep showing the last view

    tasks = [asyncio.create_task(one(*w)) for w in watches]
    try:
        done, _ = await asyncio.wait(tasks, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        return bool(done)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await task


async def cmd_describe(client: KubeClient, args: argparse.Namespace, out: TextIO) -> int:
    bps = await get_set(client, args.namespace, args.name)
    pods, _ = await pods_of(client, args.namespace, args.name)
    events = await events_of(client, bps)
    if args.output in ("json", "yaml"):
        dump({"backupPodSet": bps, "pods": pods, "events": events}, args.output, out)
    else:
        out.write(render.describe(bps, pods, events, time.time()))
    return 0


async def follow_set(client: KubeClient, namespace: str, name: str) -> AsyncIterator[Obj]:
    """The set now and after every change (list+watch by name; re-list on 410)."""
    selector = f"metadata.name={name}"
    while True:
        page = await client.list(BACKUP_POD_SETS, namespace, field_selector=selector)
        items = page.get("items") or []
        if not items:
            raise BpsctlError(f'backuppodset "{name}" was deleted')
        yield items[0]
        version = str((page.get("metadata") or {}).get("resourceVersion") or "")
        try:
            while True:
                async for event in client.watch(
                    BACKUP_POD_SETS, version, namespace, field_selector=selector, timeout_seconds=60
                ):
                    obj = event["object"]
                    version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                    if event.get("type") == "DELETED":
                        raise BpsctlError(f'backuppodset "{name}" was deleted')
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        yield obj
        except Expired:
            continue


async def cmd_failover(client: KubeClient, args: argparse.Namespace, out: TextIO) -> int:
    bps = await get_set(client, args.namespace, args.name)
    pods, _ = await pods_of(client, args.namespace, args.name)
    primaries = {
        p["metadata"]["name"]: p
        for p in pods
        if render.pod_role(p) == "primary" and not p["metadata"].get("deletionTimestamp")
    }
    if not primaries:
        raise BpsctlError(f'backuppodset "{args.name}" has no live primary to fail')
    victim = args.pod or sorted(primaries)[0]
    if victim not in primaries:
        raise BpsctlError(
            f'pod "{victim}" is not a live primary of "{args.name}" '
            f"(primaries: {', '.join(sorted(primaries))})"
        )
    uid = primaries[victim]["metadata"]["uid"]
    previous = (bps.get("status") or {}).get("lastFailover")
    sent = time.time()
    try:
        await client.delete(PODS, victim, args.namespace, preconditions={"uid": uid})
    except NotFound:
        raise BpsctlError(f'pod "{victim}" is already gone') from None
    out.write(
        f"deleted primary {victim} at {time.strftime('%H:%M:%S', time.localtime(sent))}"
        f".{int(sent * 1000) % 1000:03d}; waiting up to {args.timeout:g}s for the controller\n"
    )
    out.flush()
    latest: Obj = bps
    try:
        async with asyncio.timeout(args.timeout):
            async for obj in follow_set(client, args.namespace, args.name):
                latest = obj
                failover = (obj.get("status") or {}).get("lastFailover")
                if (
                    isinstance(failover, dict)
                    and failover != previous
                    and failover.get("failedPod") == victim
                    and failover.get("restoredAt")
                ):
                    observed = time.time()
                    out.write(render.failover_timeline(failover))
                    out.write(
                        f"seen by bpsctl: delete sent → restored status read: "
                        f"{render.millis(observed - sent)}\n"
                    )
                    out.write(render.set_summary(obj, observed))
                    return 0
    except TimeoutError:
        out.write(render.set_summary(latest, time.time()))
        raise BpsctlError(
            f"the set was not restored within {args.timeout:g}s (is the controller running?)"
        ) from None
    return EXIT_FAILED


# -- argument parsing ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    # Accepted before and after the verb, like kubectl's; SUPPRESS keeps a subcommand's parser
    # from resetting a value given before the verb.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)"
    )
    common.add_argument("--context", help="kubeconfig context to use")
    common.add_argument("-n", "--namespace", help="namespace (default: the context's)")
    common.add_argument(
        "--request-timeout", type=float, metavar="SECONDS", help="per API request (default 10)"
    )
    parser = argparse.ArgumentParser(
        prog="bpsctl",
        description="Look at and operate BackupPodSets (primaries, hot and cold backups).",
        parents=[common],
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    status = sub.add_parser(
        "status", parents=[common], help="desired vs ready per role; with NAME, its pods"
    )
    status.add_argument("name", nargs="?", metavar="NAME")
    status.add_argument("-A", "--all-namespaces", action="store_true")
    status.add_argument("-o", "--output", choices=("wide", "json", "yaml"))
    status.add_argument("-w", "--watch", action="store_true", help="re-print on every change")
    status.add_argument(
        "--watch-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop watching after this long (default: until interrupted)",
    )

    describe = sub.add_parser(
        "describe", parents=[common], help="spec, status, conditions, failover timeline, events"
    )
    describe.add_argument("name", metavar="NAME")
    describe.add_argument("-o", "--output", choices=("json", "yaml"))

    failover = sub.add_parser(
        "failover",
        parents=[common],
        help="delete a primary on purpose and print the measured recovery timeline",
    )
    failover.add_argument("name", metavar="NAME")
    failover.add_argument("pod", nargs="?", metavar="POD", help="default: the first primary")
    failover.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    return parser


COMMON_DEFAULTS: dict[str, Any] = {
    "kubeconfig": None,
    "context": None,
    "namespace": None,
    "request_timeout": 10.0,
    "all_namespaces": False,
    "output": None,
}
COMMANDS = {"status": cmd_status, "describe": cmd_describe, "failover": cmd_failover}


async def run(args: argparse.Namespace, out: TextIO) -> int:
    kubeconfig = kubeconfig_path(args.kubeconfig)
    if args.namespace is None:
        args.namespace = context_namespace(kubeconfig, args.context)
    client = await connect(kubeconfig, args.context, args.request_timeout)
    try:
        return await COMMANDS[args.command](client, args, out)
    except Unavailable as error:
        if error.code == 0:
            raise BpsctlError(f"cannot reach the API server at {client.host}") from None
        raise BpsctlError(f"the API server at {client.host} failed: {error}") from None
    except ApiError as error:
        raise BpsctlError(f"{error.reason}: {error.message or error}") from None
    finally:
        await client.close()


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    for name, default in COMMON_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        return asyncio.run(run(args, out or sys.stdout))
    except BpsctlError as error:
        print(f"bpsctl: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
