"""The one exception type for objects rapproxy cannot use.

An invalid object is never fatal: the caller logs the reason, counts it and skips the object.
The message always names the offending field the way the API server would (`spec.ports[1].port`).
"""


class InvalidObject(ValueError):
    """A Kubernetes object that rapproxy must skip; `str()` names the object and the field."""

    def __init__(self, kind: str, key: str, field: str, reason: str) -> None:
        self.kind = kind
        self.key = key
        self.field = field
        self.reason = reason
        super().__init__(f"{kind} {key}: {field}: {reason}")
