"""Optional redaction of e-mail addresses and phone numbers before feedback is stored.

Off by default (PROSPECT_REDACT_PII). When on, ``service.ingest.to_row`` calls
:func:`redact_row` on the row *before* its payload hash is computed, so the hash covers the
redacted text: a retry of the same event redacts to the same text and is still a duplicate,
never a conflict. The raw text exists only in the request's memory.

Pattern-based, so best effort: it catches the usual written forms (``name@host.tld``,
``+44 20 7946 0958``, ``(555) 123-4567``, ``555.123.4567``) and leaves dates, versions and
plain numbers alone; a phone number written as one run of digits without ``+`` or separators
is not recognised. Every pattern is bounded (no nested unbounded repetition), so a hostile
100,000-character text costs linear time.
"""

from __future__ import annotations

import re
from typing import Any

EMAIL_MASK = "[email]"
PHONE_MASK = "[phone]"

#: Local part up to 64 characters (RFC 5321), then labels of a domain; the look-behind makes
#: a start inside a run of local-part characters fail at once (linear time).
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)

#: An optional +country code, an optional (area code), then 2 to 6 groups of 2 to 8 digits
#: joined by one space, dot or dash; or "+" and 8 to 15 digits in one run. The digit count
#: is checked in :func:`_phone` (E.164 allows at most 15).
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{8,15}"
    r"|(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{2,8}(?:[ .\-]\d{2,8}){1,5}"
    r")(?![\w])"
)
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}|\d{2}[./-]\d{2}[./-]\d{4}|\d{4}[./]\d{2}[./]\d{2}")


def _phone(m: re.Match[str]) -> str:
    text = m.group(0)
    digits = sum(c.isdigit() for c in text)
    international = text.startswith("+")
    if digits > 15 or digits < (8 if international else 9):
        return text
    if not international and "(" not in text and _ISO_DATE.fullmatch(text):
        return text
    return PHONE_MASK


def redact_text(text: str) -> str:
    """``text`` with e-mail addresses and phone numbers replaced by their masks."""
    if "@" in text:
        text = _EMAIL.sub(EMAIL_MASK, text)
    if any(c.isdigit() for c in text):
        text = _PHONE.sub(_phone, text)
    return text


def redact_prompt(prompt: Any) -> Any:
    """A prompt string, or a list of {role, content} messages with each content redacted."""
    if isinstance(prompt, str):
        return redact_text(prompt)
    if isinstance(prompt, list):
        return [{**m, "content": redact_text(m["content"])}
                if isinstance(m, dict) and isinstance(m.get("content"), str) else m
                for m in prompt]
    return prompt


#: The free-text columns a user or a model wrote; identifiers and metadata are the client's.
TEXT_FIELDS = ("completion", "correction", "comment")


def redact_row(row: dict[str, Any]) -> dict[str, Any]:
    """Redact a row about to be stored (in place; returned for convenience)."""
    row["prompt"] = redact_prompt(row["prompt"])
    for name in TEXT_FIELDS:
        value = row.get(name)
        if isinstance(value, str):
            row[name] = redact_text(value)
    return row
