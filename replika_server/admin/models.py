"""The JSON bodies of the admin API's scripting routes (publish, settle) and of their replies, as the OpenAPI
document shows them.

Where the broker itself checks a value (a lease token's range, a delay's, base64), the schema states the
constraint but FastAPI does not enforce it, so that the broker's check answers, with its stable code (400
``BAD_REQUEST``), as over TCP.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from replika_server.admin.errors import ErrorBody
from replika_server.admin.seam import MAX_DELAY, MAX_LEASE, StaleReason

__all__ = [
    "MAX_JSON_INT",
    "Leases",
    "NothingSettled",
    "PublishBatch",
    "PublishMessage",
    "Settle",
    "SettleReply",
    "Touch",
]

#: The largest id or lease token a JSON body may carry: JSON's exact integers (RFC 7493, I-JSON), which a
#: JavaScript client can hold; the broker's counters start at 1 and never come near it.
MAX_JSON_INT = 2**53 - 1
#: Standard base64 with its padding, as ``base64.b64decode(..., validate=True)`` takes it.
BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"

_Id = Annotated[int, Field(ge=0, le=MAX_JSON_INT)]


def _number(lo: float, hi: float, description: str) -> dict[str, Any]:
    return {"type": "number", "minimum": lo, "maximum": hi, "description": description}


class PublishMessage(BaseModel):
    # utf-8 needs no base64 pattern; base64 does (the schema's anyOf, for generators and readers alike).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"properties": {"encoding": {"const": "utf-8"}}},
                {"properties": {"encoding": {"const": "base64"}, "payload": {"pattern": BASE64}}},
            ]
        }
    )

    payload: str = Field(description="the message: text, or base64 when encoding is base64")
    encoding: str = Field(
        "utf-8", description="utf-8 (default) or base64", json_schema_extra={"enum": ["utf-8", "base64"]}
    )
    headers: dict[str, str] | None = None


class PublishBatch(BaseModel):
    messages: list[PublishMessage]


class Leases(BaseModel):
    leases: list[tuple[_Id, _Id]] = Field(
        description="[id, lease] pairs from fetch replies (at most --max-batch)", json_schema_extra={"minItems": 1}
    )


class Settle(Leases):
    delay: Annotated[float, WithJsonSchema(_number(0, MAX_DELAY, "seconds"))] | None = Field(
        None, description="nack only: seconds before the messages are ready again"
    )


class Touch(Leases):
    lease: Annotated[float, WithJsonSchema(_number(0.001, MAX_LEASE, "seconds"))] = Field(
        30.0, description="seconds from now until each lease ends (as fetch's lease)"
    )


class SettleReply(BaseModel):
    """Every lease settled (``failed`` empty), or some: ``failed`` names the others, ``reasons`` says why."""

    failed: dict[str, str] = Field(description="message id -> STALE_LEASE, for each lease that was refused")
    reasons: dict[str, StaleReason] | None = Field(
        None, description="message id -> why its lease is stale (gone, redelivered, settled, unknown); SPEC.md"
    )


class NothingSettled(ErrorBody, SettleReply):
    """409 ``STALE_LEASE``: not one lease of the request was settled."""
