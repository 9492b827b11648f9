"""One error shape for every 4xx/5xx the API returns, so clients can always find the field."""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from starlette.responses import Response


class FieldError(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Body of every error answer: a machine code, a sentence, and the fields at fault."""

    error: str
    message: str
    errors: list[FieldError] = []


class JSONResp(Response):
    """orjson-rendered JSON: the hot path returns plain dicts, skipping response models."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    """Raised anywhere in a request; rendered as ErrorBody with ``status``."""

    def __init__(
        self,
        status: int,
        error: str,
        message: str,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.errors = errors or []
        self.headers = headers

    def response(self) -> JSONResp:
        return JSONResp(
            {"error": self.error, "message": self.message, "errors": self.errors},
            status_code=self.status,
            headers=self.headers,
        )


def loc_to_field(loc: tuple[Any, ...] | list[Any]) -> str:
    """('prompt', 2, 'content') -> 'prompt[2].content'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def error_response_doc(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}
