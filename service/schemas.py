"""The API contract: pydantic models for what clients send and what the API answers.

Input limits come from Settings, so the input models are built per configuration by
``input_models(settings)`` (cached). Every text field rejects NUL characters: Postgres cannot
store ``\\u0000`` in text, and a clear 422 beats a 500 from the driver.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

from service.settings import Settings

ItemStatus = Literal["accepted", "duplicate", "conflict", "rejected"]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain NUL (\\u0000) characters")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "must not be empty")
    return value


def _label(value: Any) -> bool:
    """Accept "up"/"down" and JSON true/false; nothing else (no 1/0, no "yes")."""
    if value is True or value is False:
        return value
    if isinstance(value, str):
        lowered = value.lower()
        if lowered == "up":
            return True
        if lowered == "down":
            return False
    raise PydanticCustomError("label", 'must be "up", "down", true or false')


Label = Annotated[bool, BeforeValidator(_label)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str
    content: str


class _Limits:
    """Plain holder so the validators below can read the configured limits."""

    def __init__(self, s: Settings) -> None:
        self.text = s.max_text_chars
        self.ident = s.max_id_chars
        self.messages = s.max_prompt_messages
        self.meta_bytes = s.max_metadata_bytes
        self.meta_depth = s.max_metadata_depth
        self.meta_keys = s.max_metadata_keys
        self.future = timedelta(seconds=s.max_future_skew_s)


def _check_metadata(value: dict[str, Any], limits: _Limits) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:  # pragma: no cover - input is JSON
        raise PydanticCustomError("metadata", "must be JSON-serialisable: {e}", {"e": str(exc)})
    if len(encoded) > limits.meta_bytes:
        raise PydanticCustomError(
            "metadata_too_large",
            "is {n} bytes as JSON; the maximum is {m}",
            {"n": len(encoded), "m": limits.meta_bytes},
        )
    count = 0

    def walk(node: Any, depth: int, path: str) -> None:
        nonlocal count
        if depth > limits.meta_depth:
            raise PydanticCustomError(
                "metadata_too_deep", "nesting deeper than {m} levels at {p}",
                {"m": limits.meta_depth, "p": "metadata" + path},
            )
        if isinstance(node, dict):
            for key, child in node.items():
                count += 1
                if count > limits.meta_keys:
                    raise PydanticCustomError(
                        "metadata_too_many_keys", "has more than {m} keys", {"m": limits.meta_keys}
                    )
                if "\x00" in key:
                    raise PydanticCustomError(
                        "nul_character", "key {k!r} must not contain NUL (\\u0000) characters",
                        {"k": key.replace("\x00", "\\u0000")},
                    )
                walk(child, depth + 1, f"{path}.{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, depth + 1, f"{path}[{i}]")
        elif isinstance(node, str) and "\x00" in node:
            raise PydanticCustomError(
                "nul_character", "value at {p} must not contain NUL (\\u0000) characters",
                {"p": "metadata" + path},
            )

    walk(value, 1, "")
    return value


def _check_prompt(value: Any, limits: _Limits) -> str | list[dict[str, str]]:
    """A non-empty string, or a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        _not_blank(value)
        if len(value) > limits.text:
            raise PydanticCustomError(
                "too_long", "must be at most {m} characters", {"m": limits.text}
            )
        return _no_nul(value)
    if isinstance(value, list):
        if not value:
            raise PydanticCustomError("empty", "must not be empty")
        if len(value) > limits.messages:
            raise PydanticCustomError(
                "too_many_messages", "has {n} messages; the maximum is {m}",
                {"n": len(value), "m": limits.messages},
            )
        total = 0
        out = []
        for i, msg in enumerate(value):
            if (
                not isinstance(msg, dict)
                or set(msg) != {"role", "content"}
                or not isinstance(msg["role"], str)
                or not isinstance(msg["content"], str)
            ):
                raise PydanticCustomError(
                    "message", "[{i}] must be an object with string fields role and content only",
                    {"i": i},
                )
            if not msg["role"] or len(msg["role"]) > 64:
                raise PydanticCustomError("message", "[{i}].role must be 1-64 characters", {"i": i})
            if "\x00" in msg["role"] or "\x00" in msg["content"]:
                raise PydanticCustomError(
                    "nul_character", "[{i}] must not contain NUL (\\u0000) characters", {"i": i}
                )
            total += len(msg["content"])
            out.append({"role": msg["role"], "content": msg["content"]})
        if total > limits.text:
            raise PydanticCustomError(
                "too_long", "messages total {n} characters; the maximum is {m}",
                {"n": total, "m": limits.text},
            )
        return out
    raise PydanticCustomError("prompt_type", "must be a string or a list of {role, content} messages")


def input_models(settings: Settings) -> dict[str, type[BaseModel]]:
    """The input models with ``settings``' limits: {"FeedbackIn": ..., "PairIn": ...}."""
    key = (
        settings.max_text_chars, settings.max_id_chars, settings.max_prompt_messages,
        settings.max_metadata_bytes, settings.max_metadata_depth, settings.max_metadata_keys,
        settings.max_future_skew_s,
    )
    return _models_for(key)


@lru_cache(maxsize=16)
def _models_for(key: tuple[Any, ...]) -> dict[str, type[BaseModel]]:
    s = Settings.model_construct(
        max_text_chars=key[0], max_id_chars=key[1], max_prompt_messages=key[2],
        max_metadata_bytes=key[3], max_metadata_depth=key[4], max_metadata_keys=key[5],
        max_future_skew_s=key[6],
    )
    limits = _Limits(s)
    Ident = Annotated[
        str, StringConstraints(min_length=1, max_length=limits.ident), AfterValidator(_no_nul)
    ]
    Text = Annotated[str, StringConstraints(max_length=limits.text), AfterValidator(_no_nul)]
    Completion = Annotated[Text, AfterValidator(_not_blank)]

    class FeedbackIn(BaseModel):
        """One thumbs-up/down on one model answer."""

        model_config = ConfigDict(extra="forbid", title="FeedbackIn")

        event_id: Ident = Field(description="The client's idempotency key (unique per event).")
        prompt: Any = Field(
            description="The prompt: a string, or a list of chat messages {role, content}.",
            json_schema_extra={
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": ChatMessage.model_json_schema()},
                ]
            },
        )
        completion: Completion = Field(description="The model's answer that was rated.")
        label: Label = Field(
            description='"up"/true (desirable) or "down"/false (undesirable).',
            json_schema_extra={"anyOf": [{"enum": ["up", "down"]}, {"type": "boolean"}]},
        )
        model_version: Ident = Field(description="The checkpoint that produced the completion.")
        user_id: Ident | None = Field(None, description="Stored only as an HMAC-SHA256 hash.")
        session_id: Ident | None = None
        source: Ident | None = Field(None, description="Which product/frontend sent it.")
        environment: Ident | None = None
        trace_id: Ident | None = None
        request_id: Ident | None = None
        replaces: Ident | None = Field(
            None, description="event_id of this user's earlier vote on the same answer."
        )
        correction: Text | None = Field(None, description="The user's corrected answer.")
        comment: Text | None = None
        metadata: dict[str, Any] | None = Field(None, description="A small JSON object.")
        occurred_at: datetime | None = Field(
            None, description="When the user voted; defaults to the time received."
        )

        @field_validator("prompt", mode="before")
        @classmethod
        def _prompt(cls, v: Any) -> Any:
            return _check_prompt(v, limits)

        @field_validator("metadata")
        @classmethod
        def _metadata(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
            return None if v is None else _check_metadata(v, limits)

        @field_validator("occurred_at")
        @classmethod
        def _occurred_at(cls, v: datetime | None) -> datetime | None:
            if v is None:
                return None
            v = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
            if v > datetime.now(UTC) + limits.future:
                raise PydanticCustomError(
                    "future", "lies more than {s} s in the future",
                    {"s": int(limits.future.total_seconds())},
                )
            if v.year < 2000:
                raise PydanticCustomError("past", "must not be before the year 2000")
            return v

        @field_validator("replaces")
        @classmethod
        def _replaces(cls, v: str | None, info: Any) -> str | None:
            if v is not None and v == info.data.get("event_id"):
                raise PydanticCustomError("self_replace", "must not name the event itself")
            return v

    class PairIn(BaseModel):
        """A paired preference; stored as one desirable and one undesirable event."""

        model_config = ConfigDict(extra="forbid", title="PairIn")

        prompt: Any = Field(json_schema_extra={
            "anyOf": [{"type": "string"}, {"type": "array", "items": ChatMessage.model_json_schema()}]
        })
        chosen: Completion
        rejected: Completion
        model_version: Ident = "imported"
        source: Ident = "import-pairs"
        metadata: dict[str, Any] | None = None
        occurred_at: datetime | None = None

        _prompt = field_validator("prompt", mode="before")(
            classmethod(lambda cls, v: _check_prompt(v, limits))
        )
        _metadata = field_validator("metadata")(
            classmethod(lambda cls, v: None if v is None else _check_metadata(v, limits))
        )
        _occurred_at = field_validator("occurred_at")(FeedbackIn._occurred_at.__func__)  # type: ignore[attr-defined]

    return {"FeedbackIn": FeedbackIn, "PairIn": PairIn}


# ---- answers ---------------------------------------------------------------------------


class ItemResult(BaseModel):
    """What happened to one submitted event."""

    index: int
    event_id: str | None
    status: ItemStatus
    #: For rejected items: "field: message"; for conflicts: why.
    reason: str | None = None
    errors: list[dict[str, str]] | None = None


class SingleResult(BaseModel):
    event_id: str
    status: Literal["accepted", "duplicate"]


class BatchResult(BaseModel):
    accepted: int
    duplicate: int
    conflict: int
    rejected: int
    results: list[ItemResult]


class BatchIn(BaseModel):
    """Documented shape of a batch; a bare JSON list of events is accepted too."""

    events: list[dict[str, Any]]


class PairResult(BaseModel):
    index: int
    status: Literal["stored", "rejected"]
    reason: str | None = None
    errors: list[dict[str, str]] | None = None
    chosen: ItemResult | None = None
    rejected: ItemResult | None = None


class PairsResult(BaseModel):
    events_accepted: int
    events_duplicate: int
    events_conflict: int
    pairs_rejected: int
    results: list[PairResult]


class FeedbackOut(BaseModel):
    id: int
    event_id: str
    prompt: Any
    completion: str
    label: Literal["up", "down"]
    model_version: str
    user_hash: str | None
    session_id: str | None
    source: str | None
    environment: str | None
    trace_id: str | None
    request_id: str | None
    replaces: str | None
    correction: str | None
    comment: str | None
    metadata: dict[str, Any] | None
    occurred_at: datetime
    received_at: datetime


class FeedbackPage(BaseModel):
    items: list[FeedbackOut]
    #: Pass as ?cursor= to get the next page; null on the last page.
    next_cursor: str | None


class BalanceOut(BaseModel):
    n_desirable: int
    n_undesirable: int
    total: int
    target_ratio: float
    min_per_class: int
    lambda_d: float
    lambda_u: float
    natural_ratio: float | None
    achieved_ratio: float | None
    allowed: bool
    reason: str | None


class DailyCount(BaseModel):
    day: str
    n_desirable: int
    n_undesirable: int


class DailyOut(BaseModel):
    days: list[DailyCount]


class Health(BaseModel):
    status: str
