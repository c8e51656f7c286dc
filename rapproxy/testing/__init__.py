"""Test doubles built from real protocols: the emulated Kubernetes API server and its cluster.

Importable by tests, benchmarks and the demo; never by the daemon (import-linter enforces it).
"""
