"""The `rapproxy` command: one binary for the node proxy and its helpers.

Sub-commands: `run` (the daemon: proxy plus, when it holds the Lease, the BackupPodSet
controller), `bps-controller` (the controller alone), `cleanup` (remove every rule rapproxy
installed), `version`, `bps-wait` (the cold-backup init container), `demo` (the emulated edge
cluster, see `rapproxy.demo`). Errors a user can fix are printed as one line on
stderr with exit status 2; nothing here prints a traceback for bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from rapproxy import __version__, logs
from rapproxy.cluster.client import ApiError
from rapproxy.config import ConfigError, RapproxyConfiguration, defaults_yaml, load

EXIT_USAGE = 2


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where available (design §2: one loop per process), the stock loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run_async(main: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rapproxy",
        description="Resource Adaptive Proxy: a Kubernetes node proxy (local first, spilling to "
        "the best remote node when overloaded) and BackupPodSet controller.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the node proxy daemon")
    run.add_argument("--config", type=Path, help="RapproxyConfiguration YAML file")
    run.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then in-cluster config)"
    )
    run.add_argument("--context", help="kubeconfig context")
    run.add_argument("--node-name", help="this node's name (default: $NODE_NAME, then hostname)")
    run.add_argument(
        "--objects",
        type=Path,
        nargs="+",
        default=[],
        metavar="FILE",
        help="serve Services and EndpointSlices from these Kubernetes YAML files (reloaded on change)",
    )
    run.add_argument("--log-format", choices=("text", "json"))
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.add_argument("--healthz-bind-address", metavar="HOST:PORT")
    run.add_argument("--metrics-bind-address", metavar="HOST:PORT")
    run.add_argument("--service-proxy-name", help="handle only Services labelled with this name")
    run.add_argument(
        "--lb-policy", help="default policy: rap, round-robin, least-conn, random, local-only"
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one setting, e.g. --set rap.overloadThreshold=0.9 (repeatable)",
    )
    run.add_argument("--no-iptables", action="store_true", help="do not install interception rules")
    run.add_argument("--no-bps", action="store_true", help="do not run the BackupPodSet controller")
    run.add_argument(
        "--print-defaults", action="store_true", help="print the default configuration"
    )
    run.add_argument("--validate", action="store_true", help="validate the configuration and exit")

    bps = sub.add_parser(
        "bps-controller", help="run only the BackupPodSet controller (leader-elected)"
    )
    bps.add_argument("--config", type=Path, help="RapproxyConfiguration YAML file")
    bps.add_argument(
        "--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, then in-cluster config)"
    )
    bps.add_argument("--context", help="kubeconfig context")
    bps.add_argument("--identity", help="leader-election identity (default: <hostname>_<random>)")
    bps.add_argument("--metrics-bind-address", metavar="HOST:PORT", help="/metrics and /healthz")
    bps.add_argument("--log-format", choices=("text", "json"))
    bps.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    bps.add_argument("--set", action="append", default=[], metavar="PATH=VALUE")

    sub.add_parser("cleanup", help="remove every iptables rule and chain rapproxy installed")
    sub.add_parser("version", help="print the version")

    wait = sub.add_parser(
        "bps-wait", help="cold-backup init container: wait for an authenticated activation"
    )
    wait.add_argument("args", nargs=argparse.REMAINDER, help="arguments of bps-wait (see --help)")
    demo = sub.add_parser(
        "demo", help="emulated 3-node edge cluster: compare policies, fail over (root)"
    )
    demo.add_argument("args", nargs=argparse.REMAINDER, help="arguments of demo (see --help)")
    return parser


def configuration(args: argparse.Namespace) -> RapproxyConfiguration:
    text = args.config.read_text() if args.config else None
    overrides = list(args.set)
    for flag, path in (
        ("kubeconfig", "clientConnection.kubeconfig"),
        ("context", "clientConnection.context"),
        ("node_name", "hostnameOverride"),
        ("log_format", "logging.format"),
        ("log_level", "logging.level"),
        ("healthz_bind_address", "healthzBindAddress"),
        ("metrics_bind_address", "metricsBindAddress"),
        ("service_proxy_name", "serviceProxyName"),
        ("lb_policy", "proxy.lbPolicy"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{path}={value}")
    if args.no_bps:
        overrides.append("bps.enabled=false")
    return load(text, os.environ, overrides)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # bps-wait has a parser of its own: everything after the name is theirs,
    # options included (argparse.REMAINDER would refuse a leading `--port`).
    if arguments[:1] == ["bps-wait"]:
        return _bps_wait(arguments[1:])
    if arguments[:1] == ["demo"]:
        from rapproxy.demo import main as demo_main

        return demo_main(arguments[1:])
    parser = build_parser()
    args = parser.parse_args(arguments)
    try:
        if args.command == "version":
            print(f"rapproxy {__version__}")
            return 0
        if args.command == "run":
            return _run(args)
        if args.command == "cleanup":
            return _cleanup()
        if args.command == "bps-controller":
            return _bps_controller(args)
    except ConfigError as error:
        print(f"rapproxy: invalid configuration: {error}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as error:
        print(f"rapproxy: {error}", file=sys.stderr)
        return 1
    parser.print_help()
    return EXIT_USAGE


def _run(args: argparse.Namespace) -> int:
    from rapproxy import daemon

    if args.print_defaults:
        print(defaults_yaml(), end="")
        return 0
    config = configuration(args)
    if args.validate:
        print("configuration is valid")
        return 0
    logs.configure(config.logging.format, config.logging.level)
    options = daemon.RunOptions(objects=tuple(args.objects), intercept=not args.no_iptables)
    try:
        run_async(daemon.run(config, options))
    except (daemon.StartupError, ApiError) as error:
        print(f"rapproxy: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return 0


def _bps_controller(args: argparse.Namespace) -> int:
    from rapproxy.bps.controller import run_standalone

    text = args.config.read_text() if args.config else None
    overrides = list(args.set)
    for flag, path in (
        ("kubeconfig", "clientConnection.kubeconfig"),
        ("context", "clientConnection.context"),
        ("log_format", "logging.format"),
        ("log_level", "logging.level"),
        ("metrics_bind_address", "metricsBindAddress"),
    ):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{path}={value}")
    config = load(text, os.environ, overrides)
    logs.configure(config.logging.format, config.logging.level)
    try:
        run_async(run_standalone(config, args.identity))
    except ApiError as error:
        print(f"rapproxy: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return 0


def _cleanup() -> int:
    from rapproxy import daemon

    logs.configure()
    touched = run_async(daemon.cleanup())
    print("removed rapproxy rules" if touched else "no rapproxy rules found")
    return 0


def _bps_wait(argv: Sequence[str]) -> int:
    from rapproxy.bps.activation import run_bps_wait

    return run_bps_wait(list(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
