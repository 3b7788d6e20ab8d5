"""Small helpers the templates use to show the dicts of :mod:`celery_stepped.views`.

Values are formatted by :mod:`celery_stepped.rendering`, as on the command line, so a
duration or a step position reads the same in a terminal and on a page.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from ...rendering import arguments_text, duration_text, error_text, step_position
from ...statuses import COMPLETION_STATUSES, FINAL_STATUSES

__all__ = ["is_final", "template_helpers", "with_shared_marked"]


def _children(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The member actions of every step of ``node`` that are full nodes."""
    for step in node.get("steps", []):
        for member in step["members"]:
            action = member.get("action")
            if action is not None and "status" in action:
                yield action


def is_final(node: dict[str, Any]) -> bool:
    """True when every action in the tree reached a final status (nothing will change)."""
    if node["status"] not in FINAL_STATUSES:
        return False
    return all(is_final(child) for child in _children(node))


def with_shared_marked(node: dict[str, Any]) -> tuple[dict[str, Any], frozenset[int]]:
    """A copy of the tree in which an action met a second time (shared by two steps, or
    a superseder inherited by another parent) is ``{"id": .., "shared": True}``: it is
    drawn once, and its other places link to it. Also the ids of every action drawn."""
    seen: set[int] = set()

    def copy(current: dict[str, Any]) -> dict[str, Any]:
        seen.add(current["id"])
        steps = []
        for step in current["steps"]:
            members = []
            for member in step["members"]:
                action = member.get("action")
                if action is not None and "status" in action:
                    shared = action["id"] in seen
                    action = {"id": action["id"], "shared": True} if shared else copy(action)
                members.append({**member, "action": action})
            steps.append({**step, "members": members})
        return {**current, "steps": steps}

    shown = copy(node)
    return shown, frozenset(seen)


def when(iso: str | None) -> str:
    """``2026-11-29 00:37:15`` (UTC) of an ISO timestamp; empty for None."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")


def clock(iso: str | None) -> str:
    """``00:37:15.42`` (UTC) of an ISO timestamp; empty for None."""
    if not iso:
        return ""
    return datetime.fromisoformat(iso).strftime("%H:%M:%S.%f")[:11]


def status_word(status: str) -> str:
    """A status as words: ``timed out`` for ``timed_out``."""
    return status.replace("_", " ")


def template_helpers() -> dict[str, Any]:
    """The names every template of the blueprint may use."""
    return {
        "arguments_text": arguments_text,
        "clock": clock,
        "completion_statuses": COMPLETION_STATUSES,
        "duration_text": duration_text,
        "error_text": error_text,
        "final_statuses": FINAL_STATUSES,
        "status_word": status_word,
        "step_position": step_position,
        "when": when,
    }
