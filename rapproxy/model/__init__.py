"""Pure model types: immutable values parsed from Kubernetes objects; no I/O.

Everything that crosses a layer boundary in rapproxy is one of these frozen dataclasses. Parsing
happens once, at the edge, and rejects a malformed object with an exception that names the field,
so one broken Service never reaches (or breaks) the data plane for the others.
"""
