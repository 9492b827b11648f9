"""The API contract: pydantic models for what clients send and what the API answers.

Input limits come from Settings, so the input models are built per configuration by
``input_models(settings)`` (cached). Every text field rejects NUL characters: Postgres cannot
store ``\\u0000`` in text, and a clear 422 beats a 500 from the driver.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

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
from service.text import NoNul

ItemStatus = Literal["accepted", "duplicate", "conflict", "rejected"]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty", "must not be empty")
    return value


def _blank_is_none(value: str | None) -> str | None:
    """A frontend sends an untouched correction box as "" or spaces: the vote stands, and a
    blank answer must not become a desirable training example."""
    return value if value is None or value.strip() else None


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


def _check_metadata(value: dict[str, Any], limits: _Limits, nul_checks: bool = True
                    ) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:  # pragma: no cover - input is JSON
        raise PydanticCustomError(
            "metadata", "must be JSON-serialisable: {e}", {"e": str(exc)}
        ) from None
    if len(encoded) > limits.meta_bytes:
        raise PydanticCustomError(
            "metadata_too_large",
            "is {n} bytes as JSON; the maximum is {m}",
            {"n": len(encoded), "m": limits.meta_bytes},
        )
    if not nul_checks and encoded.count(b"{") + encoded.count(b"[") <= 1:
        # Flat object (brackets inside strings only overcount): depth 1, keys = len.
        if len(value) > limits.meta_keys:
            raise PydanticCustomError(
                "metadata_too_many_keys", "has more than {m} keys", {"m": limits.meta_keys}
            )
        return value
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
                        "nul_character", "key '{k}' must not contain NUL (\\u0000) characters",
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


def input_models(settings: Settings, nul_checks: bool = True) -> dict[str, type[BaseModel]]:
    """The input models with ``settings``' limits: {"FeedbackIn": ..., "PairIn": ...}.

    ``nul_checks=False`` builds the same models without the per-field NUL validators; the
    API uses them only for bodies that contain no ``\\u0000`` escape at all (JSON cannot
    carry a NUL character any other way), which saves a Python call per text field.
    """
    key = (
        settings.max_text_chars, settings.max_id_chars, settings.max_prompt_messages,
        settings.max_metadata_bytes, settings.max_metadata_depth, settings.max_metadata_keys,
        settings.max_future_skew_s, nul_checks,
    )
    return _models_for(key)


@lru_cache(maxsize=16)
def _models_for(key: tuple[Any, ...]) -> dict[str, type[BaseModel]]:
    s = Settings.model_construct(
        max_text_chars=key[0], max_id_chars=key[1], max_prompt_messages=key[2],
        max_metadata_bytes=key[3], max_metadata_depth=key[4], max_metadata_keys=key[5],
        max_future_skew_s=key[6],
    )
    nul_checks = key[7]
    limits = _Limits(s)
    nul = (NoNul,) if nul_checks else ()
    Ident = Annotated[str, StringConstraints(min_length=1, max_length=limits.ident), *nul]
    Text = Annotated[str, StringConstraints(max_length=limits.text), *nul]
    Completion = Annotated[Text, AfterValidator(_not_blank)]

    class PromptMessage(BaseModel):
        model_config = ConfigDict(extra="forbid", title="ChatMessage")
        role: Annotated[str, StringConstraints(min_length=1, max_length=64), *nul]
        content: Text

    # Validated natively by pydantic-core (left to right: a string, else a message list).
    Prompt = Annotated[
        Union[  # noqa: UP007 - Annotated members need the Union spelling
            Completion,
            Annotated[list[PromptMessage],
                      Field(min_length=1, max_length=limits.messages)],
        ],
        Field(union_mode="left_to_right",
              description="A string, or a list of chat messages {role, content}."),
    ]

    def check_metadata(v: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if v is None else _check_metadata(v, limits, nul_checks)

    def check_occurred_at(v: datetime | None) -> datetime | None:
        if v is None:
            return None
        try:
            v = v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00+05:00 has no UTC time (found by fuzzing)
            v = datetime.max.replace(tzinfo=UTC) if v.year > 1 else datetime(1, 1, 1, tzinfo=UTC)
        if v > datetime.now(UTC) + limits.future:
            raise PydanticCustomError(
                "future", "lies more than {s} s in the future",
                {"s": int(limits.future.total_seconds())},
            )
        if v.year < 2000:
            raise PydanticCustomError("past", "must not be before the year 2000")
        return v

    Metadata = Annotated[dict[str, Any] | None, AfterValidator(check_metadata)]
    OccurredAt = Annotated[datetime | None, AfterValidator(check_occurred_at)]

    class FeedbackIn(BaseModel):
        """One thumbs-up/down on one model answer."""

        model_config = ConfigDict(extra="forbid", title="FeedbackIn")

        event_id: Ident = Field(description="The client's idempotency key (unique per event).")
        prompt: Prompt
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
        correction: Annotated[Text | None, AfterValidator(_blank_is_none)] = Field(
            None, description="The user's corrected answer (blank: none).")
        comment: Text | None = None
        metadata: Metadata = Field(None, description="A small JSON object.")
        occurred_at: OccurredAt = Field(
            None, description="When the user voted; defaults to the time received."
        )

        @field_validator("replaces")
        @classmethod
        def _replaces(cls, v: str | None, info: Any) -> str | None:
            if v is not None and v == info.data.get("event_id"):
                raise PydanticCustomError("self_replace", "must not name the event itself")
            return v

    class PairIn(BaseModel):
        """A paired preference; stored as one desirable and one undesirable event."""

        model_config = ConfigDict(extra="forbid", title="PairIn")

        prompt: Prompt
        chosen: Completion
        rejected: Completion
        model_version: Ident = "imported"
        source: Ident = "import-pairs"
        metadata: Metadata = None
        occurred_at: OccurredAt = None

        @field_validator("rejected")
        @classmethod
        def _differs(cls, v: str, info: Any) -> str:
            # The same answer both up- and down-voted would teach nothing but noise.
            if v == info.data.get("chosen"):
                raise PydanticCustomError("same_as_chosen", "must differ from chosen")
            return v

    return {"FeedbackIn": FeedbackIn, "PairIn": PairIn}


def prompt_value(prompt: Any) -> str | list[dict[str, str]]:
    """The validated prompt as plain JSON data (messages become dicts)."""
    if isinstance(prompt, str):
        return prompt
    return [{"role": m.role, "content": m.content} for m in prompt]


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
    #: With ?line=: the line and its feedback scope (what was counted); null otherwise.
    line: str | None = None
    feedback: Literal["all", "served"] | None = None
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
    line: str | None = None
    feedback: Literal["all", "served"] | None = None
    days: list[DailyCount]


class Health(BaseModel):
    status: str
