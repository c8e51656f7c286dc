"""API errors as the real kube-apiserver renders them: `metav1.Status` bodies.

Every rejection inside the emulator is an `ApiError` carrying the exact Status JSON a real
v1.28 server would send, so the HTTP layer only has to serialize it. The constructors below encode
the quirks clients rely on: `details.kind` is the *resource* for NotFound/Conflict/AlreadyExists
but the *Kind* for Invalid, `details.group` only for non-core groups, no `details` on BadRequest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JsonObject = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Cause:
    """One `details.causes[]` entry of a 422: which field is wrong and why."""

    reason: str  # FieldValueInvalid | FieldValueRequired | FieldValueNotSupported | ...
    message: str
    field: str

    def render(self) -> str:
        return f"{self.field}: {self.message}"


class ApiError(Exception):
    """A request the emulated server refuses; `status` is the full metav1.Status body."""

    def __init__(self, status: JsonObject) -> None:
        super().__init__(status.get("message", ""))
        self.status = status

    @property
    def code(self) -> int:
        return int(self.status["code"])


def status_failure(
    code: int, reason: str, message: str, details: JsonObject | None = None
) -> JsonObject:
    body: JsonObject = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
    }
    if details is not None:
        body["details"] = details
    body["code"] = code
    return body


def _details(name: str, group: str, kind: str) -> JsonObject:
    details: JsonObject = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    return details


def qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        status_failure(
            404,
            "NotFound",
            f'{qualified(resource, group)} "{name}" not found',
            _details(name, group, resource),
        )
    )


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        status_failure(
            409,
            "AlreadyExists",
            f'{qualified(resource, group)} "{name}" already exists',
            _details(name, group, resource),
        )
    )


def conflict(resource: str, group: str, name: str, why: str | None = None) -> ApiError:
    reason = why or (
        "the object has been modified; please apply your changes to the latest version "
        "and try again"
    )
    return ApiError(
        status_failure(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": {reason}',
            _details(name, group, resource),
        )
    )


def invalid(kind: str, group: str, name: str, causes: list[Cause]) -> ApiError:
    rendered = list(dict.fromkeys(c.render() for c in causes))  # the message lists each once
    what = rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"
    details = _details(name, group, kind)
    details["causes"] = [
        {"reason": c.reason, "message": c.message, "field": c.field} for c in causes
    ]
    return ApiError(
        status_failure(
            422, "Invalid", f'{qualified(kind, group)} "{name}" is invalid: {what}', details
        )
    )


def bad_request(message: str) -> ApiError:
    return ApiError(status_failure(400, "BadRequest", message))


def unsupported_media_type(message: str = "415: Unsupported Media Type") -> ApiError:
    details: JsonObject | None = {} if message.startswith("415") else None
    return ApiError(status_failure(415, "UnsupportedMediaType", message, details))


def patch_rejected() -> ApiError:
    """A JSON patch `test` that fails or a `remove` of a missing path (generic 422)."""
    return ApiError(
        status_failure(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request",
            {},
        )
    )


def expired(message: str) -> ApiError:
    return ApiError(status_failure(410, "Expired", message))


def method_not_allowed() -> ApiError:
    return ApiError(
        status_failure(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            {},
        )
    )


def internal_error(message: str) -> ApiError:
    return ApiError(status_failure(500, "InternalError", message, {}))


def too_many_requests() -> ApiError:
    return ApiError(
        status_failure(
            429,
            "TooManyRequests",
            "Too many requests, please try again later.",
            {"retryAfterSeconds": 1},
        )
    )


def required(field: str) -> Cause:
    return Cause("FieldValueRequired", "Required value", field)


def invalid_value(field: str, value: Any, why: str) -> Cause:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return Cause("FieldValueInvalid", f"Invalid value: {shown}: {why}", field)


def forbidden(field: str, why: str) -> Cause:
    return Cause("FieldValueForbidden", f"Forbidden: {why}", field)


def not_supported(field: str, value: str, supported: list[str]) -> Cause:
    listed = ", ".join(f'"{s}"' for s in supported)
    return Cause(
        "FieldValueNotSupported",
        f'Unsupported value: "{value}": supported values: {listed}',
        field,
    )
