"""The emulated edge cluster: nodes as network namespaces on a WAN with delay, bandwidth and CPU caps.

Built for the demo and the edge benchmarks (design §5). Start at `cluster.EdgeCluster`; the WAN
(router namespace + userspace delay line) is `wan.py` and `forwarder.py`, CPU capacity per node
is `cgroups.py`, and pods run as real processes through `runtime.ProcessRuntime`, the emulated
kubelet's `PodRuntime`. Nothing is re-exported here, so the forwarder process, which imports
`delays`, starts without loading the rest.
"""
