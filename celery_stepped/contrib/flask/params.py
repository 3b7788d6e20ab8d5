"""What a request asks for, checked: action ids, index filters, completion statuses.

Every check raises :class:`~celery_stepped.contrib.flask.responses.Problem` with a 4xx,
so that no input a person or a program can type reaches SQL in a shape the database
rejects (a 500).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...statuses import COMPLETION_STATUSES
from ...views import MAX_PER_PAGE
from .responses import Problem

__all__ = ["MAX_ID", "MAX_PAGE", "PER_PAGE", "action_id", "completion_status", "index_filters"]

#: The largest id an action can have (a 32-bit SQL integer); larger ones are unknown.
MAX_ID = 2**31 - 1
#: The last page the index serves; a larger page number is refused.
MAX_PAGE = 1_000_000
#: Rows per index page unless ``per_page`` says otherwise.
PER_PAGE = 25


def _whole_number(text: str) -> int | None:
    """The value of a string of ASCII digits (at most 10 of them), else None."""
    if text.isascii() and text.isdigit() and len(text) <= 10:
        return int(text)
    return None


def action_id(raw: str) -> int:
    """The id in ``/actions/<raw>`` (``12`` or ``12.json``); 404 for anything else."""
    text = raw.removesuffix(".json")
    number = _whole_number(text)
    if number is None or not 1 <= number <= MAX_ID:
        raise Problem(404, f"no action {text!r}: action ids are whole numbers")
    return number


def _text(args: Mapping[str, str], name: str) -> str | None:
    value = (args.get(name) or "").strip()
    if "\x00" in value:
        raise Problem(400, f"{name} must not contain NUL characters")
    return value or None


def _page_number(args: Mapping[str, str], name: str, default: int, largest: int) -> int:
    raw = _text(args, name)
    if raw is None:
        return default
    number = _whole_number(raw)
    if number is None or not 1 <= number <= largest:
        raise Problem(400, f"{name} must be a whole number from 1 to {largest}, not {raw!r}")
    return number


def index_filters(args: Mapping[str, str]) -> dict[str, Any]:
    """The keyword arguments of :func:`~celery_stepped.views.root_rows` a query asks for.

    Empty fields (an HTML filter form sends them) mean "no filter". The status is checked
    by ``root_rows`` itself (a ``ValueError``, answered 400).
    """
    return {
        "status": _text(args, "status"),
        "name": _text(args, "name"),
        "actor": _text(args, "actor"),
        "page": _page_number(args, "page", 1, MAX_PAGE),
        "per_page": _page_number(args, "per_page", PER_PAGE, MAX_PER_PAGE),
    }


def completion_status(raw: str | None) -> str:
    """The status to complete an outbound action with (default ``succeeded``)."""
    status = (raw or "succeeded").strip()
    if status not in COMPLETION_STATUSES:
        raise Problem(400, f"status must be one of {', '.join(COMPLETION_STATUSES)}")
    return status
