"""Stepped actions in Celery's canvas: :class:`SteppedSignature` and call options.

A stepped signature behaves in ``chain``, ``group`` and ``chord`` like a task that
finishes when its action is final. Its arguments are dumped when it is built (actors
as ``{"__stepped_actor__": [type, id]}`` references), so it travels as JSON inside
other tasks' messages. The options Celery's canvas puts on a task (``link``,
``link_error``, ``chain``, ``chord``, ``group_id``, ...) travel with the start message
and are stored with the root action; :mod:`celery_stepped.results` applies them
when the root completes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery.canvas import Signature

if TYPE_CHECKING:
    from celery.result import AsyncResult

    from .models import Action

__all__ = ["CALL_OPTIONS", "CallOptions", "SteppedSignature", "call_options"]

#: Celery's standard options a root call takes (API.md section 4).
CALL_OPTIONS = frozenset(
    {"countdown", "eta", "expires", "queue", "task_id", "link", "link_error", "priority"}
)
#: What Celery's canvas adds to a task inside a chain, group or chord (kept with the root).
CANVAS_OPTIONS = frozenset({"chain", "chord", "group_id", "group_index", "root_id", "parent_id"})
#: Publishing details Celery's canvas passes along; accepted and not used.
IGNORED_OPTIONS = frozenset(
    {
        "producer",
        "publisher",
        "connection",
        "router",
        "route_name",
        "add_to_parent",
        "reply_to",
        "stamped_headers",
        "stamps",
    }
)


@dataclass
class CallOptions:
    """A root call's options, split: how to send the start message, and the canvas
    (callbacks, chain, chord membership) to apply when the root is final."""

    task_id: str | None = None
    countdown: float | None = None
    expires: float | None = None
    queue: str | None = None
    priority: int | None = None
    canvas: dict[str, Any] = field(default_factory=dict)


def _seconds_until(value: Any, now: datetime) -> float:
    """Seconds from now until ``value`` (a datetime, an ISO string or seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if not isinstance(moment, datetime):
        raise TypeError(f"expected seconds or a datetime, got {value!r}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - now).total_seconds())


def _plain(value: Any, name: str) -> Any:
    """A JSON-ready copy of an option (signatures are dicts); TypeError otherwise."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"option {name}= must be JSON-serialisable: {exc}") from exc


def _signatures(value: Any, name: str) -> list[dict[str, Any]]:
    items = value if isinstance(value, list | tuple) else [value]
    return [_plain(item, name) for item in items if item is not None]


def call_options(options: dict[str, Any], now: datetime) -> CallOptions:
    """Split and check a root call's options; TypeError names an unknown one."""
    unknown = set(options) - CALL_OPTIONS - CANVAS_OPTIONS - IGNORED_OPTIONS
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(sorted(unknown))}; "
            f"a stepped action takes {', '.join(sorted(CALL_OPTIONS))}"
        )
    given = {k: v for k, v in options.items() if v is not None and k not in IGNORED_OPTIONS}
    result = CallOptions(task_id=given.get("task_id"), queue=given.get("queue"))
    if "countdown" in given or "eta" in given:
        result.countdown = _seconds_until(given.get("countdown", given.get("eta")), now)
    if "expires" in given:
        result.expires = _seconds_until(given["expires"], now)
    if "priority" in given:
        result.priority = int(given["priority"])
    for name in ("link", "link_error", "chain"):
        if given.get(name):
            result.canvas[name] = _signatures(given[name], name)
    for name in ("chord", "group_id", "group_index", "root_id", "parent_id", "priority"):
        if name in given:
            result.canvas[name] = _plain(given[name], name)
    return result


@Signature.register_type(name="stepped")
class SteppedSignature(Signature):
    """A Celery signature of a stepped action: ``drive.s(car, 5).later(countdown=10)``.

    Its first argument is the actor (as a reference). A parent task's result (in a
    chain, or as a ``link`` callback) comes right after the actor, not before it; an
    immutable signature (``.si()``) ignores it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self["subtask_type"] = "stepped"

    @classmethod
    def from_dict(cls, d: dict[str, Any], app: Any = None) -> SteppedSignature:
        """Rebuild a stepped signature from its message form (Celery calls this)."""
        return cls(d, app=app)

    def _merge(
        self, args: Any = None, kwargs: Any = None, options: Any = None, force: bool = False
    ) -> tuple[Any, Any, Any]:
        merged_args, merged_kwargs, merged_options = super()._merge((), kwargs, options, force)
        if args and (force or not self.immutable) and merged_args:
            merged_args = (merged_args[0], *args, *merged_args[1:])
        elif args and (force or not self.immutable):
            merged_args = tuple(args)
        return merged_args, merged_kwargs, merged_options

    def later(self, **options: Any) -> AsyncResult:
        """Enqueue the start of the root action this signature describes."""
        _, _, merged = self._merge((), {}, options)
        return self.type.apply_async(self.args, self.kwargs, **merged)

    def now(self) -> Action:
        """Run the action's synchronous part in this process."""
        action: Any = self.type
        return action.now(*self.args)
