"""Text for people: the dicts of :mod:`celery_stepped.views` as lines and rich trees.

:func:`tree_lines` and :func:`rich_tree` draw one tree of
:func:`~celery_stepped.views.action_trees`, the same way the command line does, so that
programs (the example in ``examples/plain``) show trees exactly as ``stepped tree``.
The smaller helpers format one value: a duration, an argument list, a lane entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.tree import Tree

__all__ = [
    "STATUS_STYLES",
    "Labels",
    "arguments_text",
    "brief_text",
    "duration_text",
    "error_text",
    "rich_tree",
    "step_position",
    "table_lines",
    "tree_lines",
]

Labels = Mapping[tuple[str, str], str]
"""Extra text per actor, keyed by ``(actor_type, actor_id)``."""

STATUS_STYLES = {
    "pending": "yellow",
    "performing": "cyan",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
    "superseded": "dim",
    "timed_out": "red",
    "deadlocked": "bold red",
    "skipped": "dim green",
    "waiting": "cyan",
    "done": "green",
}
"""The ``rich`` style of each action, step and member status."""


# -- values ---------------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """``1.25s`` or ``2.5min``; empty for None."""
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}min"


def arguments_text(arguments: Any) -> str:
    """An action's arguments in parentheses, cut at 60 characters; empty for none.

    An actor passed as an argument shows as ``type/id``.
    """

    def short(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"__stepped_actor__"}:
            return "/".join(str(v) for v in value["__stepped_actor__"])
        return value

    if not arguments:
        return ""
    text = ", ".join(json.dumps(short(a), ensure_ascii=False) for a in arguments)
    return f"({text[:60]}{'…' if len(text) > 60 else ''})"


def step_position(number: int | None, count: int | None) -> str:
    """``3/5``: the step (1-based ``number``) an action is at; ``-`` before it starts."""
    if number is None:
        return "-"
    return str(number) if count is None else f"{number}/{count}"


def error_text(error: Mapping[str, Any] | None, width: int = 200) -> str:
    """``Type: message`` of a stored error (first line of the message, cut at ``width``)."""
    if not error:
        return ""
    lines = str(error.get("message") or "").strip().splitlines()
    message = lines[0] if lines else ""
    text = f"{error.get('type') or 'Error'}: {message}" if message else str(error.get("type"))
    return text if len(text) <= width else f"{text[: width - 1]}…"


def brief_text(brief: Mapping[str, Any] | None) -> str:
    """One action of a lane (see :func:`~celery_stepped.views.lane_rows`) as text."""
    if brief is None:
        return "-"
    if brief.get("missing"):
        return f"#{brief['id']} (not in SQL)"
    age = duration_text(brief["age_seconds"])
    return f"#{brief['id']} {brief['name']} {brief['actor']} {brief['status']} {age}".rstrip()


def table_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A plain text table: the headers, then one line per row, in aligned columns."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in lines]


# -- trees ----------------------------------------------------------------------------------


@dataclass
class _Line:
    text: str
    status: str
    children: list[_Line] = field(default_factory=list)


def _step_label(node: dict[str, Any], step: dict[str, Any]) -> str:
    count, name = node.get("step_count"), step["name"]
    total = f"/{count}" if count else ""
    return f"step {step['number']}{total}{f' {name}' if name else ''}"


def _actor_text(actor: str, labels: Labels | None) -> str:
    actor_type, _, actor_id = actor.partition("/")
    label = (labels or {}).get((actor_type, actor_id))
    return f"{actor} [{label}]" if label else actor


def _action_text(node: dict[str, Any], labels: Labels | None) -> str:
    actor = _actor_text(node["actor"], labels)
    head = f"#{node['id']} {node['name']}{arguments_text(node['arguments'])} on {actor}"
    status, seconds = node["status"], node["duration_seconds"]
    if status == "performing":
        steps = node["steps"]
        at = steps[-1] if steps else None
        where = f", at {_step_label(node, at)}" if at else ""
        tail = f"performing for {duration_text(seconds)}{where}"
        if node["outbound"] and at and at["status"] != "performing":
            tail += ", waiting to be completed from outside"
        return f"{head}: {tail}"
    if status == "pending":
        return f"{head}: pending in lane {node['concurrency_key']}"
    if status == "superseded" and node.get("superseded_by") is not None:
        return f"{head}: superseded by #{node['superseded_by']}"
    done = f" in {duration_text(seconds)}" if seconds is not None else ""
    extra = ""
    if node["after_callbacks_failed_count"]:
        extra = f" ({node['after_callbacks_failed_count']} after callback(s) failed)"
    return f"{head}: {status}{done}{extra}"


def _step_text(node: dict[str, Any], step: dict[str, Any]) -> str:
    text = f"{_step_label(node, step)}: {step['status']}"
    total = len(step["members"])
    if step["completed_at"] is None:  # open: performing, or failed by its body
        return f"{text}, waiting on {step['pending_members']} of {total}" if total else text
    text += f" in {duration_text(step['duration_seconds'])}"
    if step["unsuccessful_members"]:
        text += f" ({step['unsuccessful_members']} of {total} unsuccessful)"
    return text


def _member_line(member: dict[str, Any], labels: Labels | None, compact: bool) -> _Line:
    if member["kind"] == "wait":
        state = "done" if member["state"] == "done" else "waiting"
        return _Line(f"wait {member['seconds']:g}s: {state}", state)
    if member["kind"] == "task":
        return _task_line(member)
    action = member["action"]
    if action is None:
        who = f"{member['name']} on {_actor_text(member['actor'], labels)}"
        if not member.get("skipped"):
            return _Line(f"{who}: not started yet", "pending")
        outcome = str(member["outcome"])
        return _Line(
            f"{who}: skipped, {outcome} without running ({member.get('reason') or ''})",
            "skipped" if outcome == "succeeded" else outcome,
        )
    if action.get("cycle"):
        return _Line(f"#{action['id']} (shown above)", "pending")
    return _node_line(action, labels, compact)


def _task_line(member: dict[str, Any]) -> _Line:
    """``task send_email(7): succeeded in 0.20s`` (a plain Celery task member)."""
    args = ", ".join(repr(a) for a in member["args"])
    text = f"task {member['name']}({args})"
    if member["state"] == "waiting":
        return _Line(f"{text}: running", "performing")
    outcome = str(member["outcome"])
    return _Line(f"{text}: {outcome} in {duration_text(member['duration_seconds'])}", outcome)


def _error_lines(error: Mapping[str, Any] | None) -> list[_Line]:
    return [_Line(error_text(error), "failed")] if error else []


def _node_line(node: dict[str, Any], labels: Labels | None, compact: bool) -> _Line:
    line = _Line(_action_text(node, labels), node["status"])
    for step in node["steps"]:
        members = [_member_line(m, labels, compact) for m in step["members"]]
        if compact and not node["root"] and _collapsible(step):
            continue
        children = [*_error_lines(step.get("error")), *members]
        line.children.append(_Line(_step_text(node, step), step["status"], children))
    line.children.extend(_error_lines(node.get("error")))
    if compact and not node["root"]:
        waits = [m["seconds"] for s in node["steps"] for m in s["members"] if m["kind"] == "wait"]
        if waits and len(line.children) < len(node["steps"]):
            line.text += f" (waited {', '.join(f'{w:g}s' for w in waits)})"
    return line


def _collapsible(step: dict[str, Any]) -> bool:
    """Compact trees hide a child's steps that only ran code or waited, and succeeded."""
    return step["status"] == "succeeded" and all(m["kind"] == "wait" for m in step["members"])


def _plain(line: _Line, prefix: str, last: bool, top: bool, out: list[str]) -> None:
    out.append(line.text if top else f"{prefix}{'└─ ' if last else '├─ '}{line.text}")
    inner = "" if top else prefix + ("   " if last else "│  ")
    for i, child in enumerate(line.children):
        _plain(child, inner, i == len(line.children) - 1, False, out)


def tree_lines(
    node: dict[str, Any], *, labels: Labels | None = None, compact: bool = False
) -> list[str]:
    """A tree of :func:`~celery_stepped.views.action_trees` as plain text lines.

    Args:
        node: one tree.
        labels: extra text per actor, keyed by ``(actor_type, actor_id)``.
        compact: hide the steps of child actions that succeeded without children.
    """
    out: list[str] = []
    _plain(_node_line(node, labels, compact), "", True, True, out)
    return out


def rich_tree(node: dict[str, Any], *, labels: Labels | None = None, compact: bool = False) -> Tree:
    """The same tree as :func:`tree_lines`, as a coloured ``rich`` Tree."""
    from rich.text import Text
    from rich.tree import Tree

    def build(line: _Line, into: Tree | None) -> Tree:
        text = Text(line.text, style=STATUS_STYLES.get(line.status, ""))
        branch = Tree(text, guide_style="dim") if into is None else into.add(text)
        for child in line.children:
            build(child, branch)
        return branch

    return build(_node_line(node, labels, compact), None)
