"""`python -m rapproxy.testing.apiserver`: run the emulated API server in the foreground.

For manual use and the demo: serves on 127.0.0.1:PORT with the control plane (one kubelet per
`--nodes` entry), writes a kubeconfig for kubectl / kubernetes-asyncio, runs until SIGINT/SIGTERM.

The kubelets run no processes (`StandInRuntime`): pods are Running and Ready at once, except
cold backups, which stay Pending in `Init:0/1` behind a stand-in `bps-wait` on 127.0.0.1 (its
port is logged). Pod IPs (10.244.N.0/24) are not routed anywhere, so a `rapproxy run` in another
process cannot reach those waiters at their pod IP: its activations time out and the controller
replaces the cold backup, as it would with an unreachable pod in a cluster. In-process users
(`rapproxy.bps.testbed`) give the controller `ControlPlane.activation_target` instead; for real
pod networking, use the edge emulation (`rapproxy demo`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from rapproxy.testing.apiserver.server import EmulatedApiServer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rapproxy.testing.apiserver")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--kubeconfig", default=None, help="write a kubeconfig here")
    parser.add_argument("--nodes", default="", help="comma-separated node names (kubelets)")
    parser.add_argument("--history-size", type=int, default=1000)
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    parser.add_argument("--no-control-plane", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    nodes = [n for n in args.nodes.split(",") if n]
    server = EmulatedApiServer(
        host=args.host,
        port=args.port,
        history_size=args.history_size,
        bookmark_interval=args.bookmark_interval,
        nodes=nodes,
        control_plane=not args.no_control_plane,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        if args.kubeconfig:
            server.write_kubeconfig(args.kubeconfig)
        print(f"emulated kube-apiserver listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
