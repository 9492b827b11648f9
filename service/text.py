"""Text checks shared by every input model and query parameter.

Postgres cannot store NUL characters; SQLite can. Refusing them at the edge gives a 422 that
names the field on both backends instead of a database error without one.
"""

from __future__ import annotations

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError


def no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise PydanticCustomError("nul_character", "must not contain NUL (\\u0000) characters")
    return value


#: Use inside ``Annotated[str | None, Field(...)/Query(...), NoNul]``.
NoNul = AfterValidator(no_nul)
