"""Checks of an internal message before it runs: its shape, its types, its depth.

A message that fails them was forged, truncated or sent by another version: the task
logs one line and rejects it (it is not retried); the worker is unharmed. Whether the
row it names exists, and is in the state it expects, each handler checks itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import SteppedError
from .events import logger
from .messages import TaskName
from .statuses import ActionStatus

#: What an ancestry looks like: comma-framed action ids.
_ANCESTRY = re.compile(r",(?:[0-9]+,)*")

__all__ = ["MAX_MESSAGE_DEPTH", "InvalidMessage", "check_message", "checked_strategy"]

#: How deep a message's arguments may nest (the arguments of a start message included).
MAX_MESSAGE_DEPTH = 48
Check = Callable[[Any], bool]


class InvalidMessage(SteppedError):
    """An internal message of the wrong shape: rejected without running."""


def _id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _optional_id(value: Any) -> bool:
    return value is None or _id(value)


def _status(value: Any) -> bool:
    return isinstance(value, str) and value in {s.value for s in ActionStatus}


def _name(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _actor_ref(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)


def _start(payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    return (
        _actor_ref(payload.get("actor"))
        and isinstance(payload.get("name"), str)
        and isinstance(payload.get("args", []), list)
        and _optional_id(payload.get("link"))
        and isinstance(payload.get("request"), str | type(None))
        and _ancestry(payload.get("ancestry"))
        and _optional_id(payload.get("action"))
    )


def _ancestry(value: Any) -> bool:
    """None, or comma-framed action ids (``,3,7,``): it reaches a Lua script and SQL."""
    return value is None or (isinstance(value, str) and bool(_ANCESTRY.fullmatch(value)))


SHAPES: dict[str, tuple[tuple[Check, ...], ...]] = {
    TaskName.START: ((_start,),),
    TaskName.RESUME: ((_id,),),
    TaskName.ADVANCE: ((_id,),),
    TaskName.WAIT: ((_id,),),
    TaskName.TIMEOUT: ((_id,),),
    TaskName.COMPLETE: (
        (_optional_id, _status),
        (_actor_ref, _name, _status),
    ),
}


def _depth(value: Any) -> int:
    """How deep ``value`` nests (without recursion, so any input is safe)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if level > MAX_MESSAGE_DEPTH:
            break
        if isinstance(item, dict):
            stack.extend((child, level + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, level + 1) for child in item)
    return deepest


def check_message(task: str, args: tuple[Any, ...]) -> None:
    """Raise InvalidMessage unless ``args`` fit one of ``task``'s shapes."""
    if _depth(list(args)) > MAX_MESSAGE_DEPTH:
        raise InvalidMessage(f"{task}: arguments nest deeper than {MAX_MESSAGE_DEPTH} levels")
    shapes = SHAPES.get(task)
    if shapes is None:
        return  # a task of a newer part (members, ...): checked by its own handler
    if not any(_fits(shape, args) for shape in shapes):
        raise InvalidMessage(f"{task}: malformed arguments {args!r:.200}")


def _fits(shape: tuple[Check, ...], args: tuple[Any, ...]) -> bool:
    return len(shape) == len(args) and all(ok(arg) for ok, arg in zip(shape, args, strict=True))


def checked_strategy(task: Any, app: Any, consumer: Any, **options: Any) -> Callable[..., Any]:
    """Celery's default strategy, after :func:`check_message` in the worker's main process.

    A malformed message is rejected (not requeued) before Celery builds its request and
    pickles it for a pool process, so a message nested 500 deep never reaches the
    pickler (which would fail the worker with RecursionError).
    """
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **options)
    errors = consumer.connection_errors

    def task_message_handler(message: Any, body: Any, ack: Any, reject: Any, *rest: Any) -> Any:
        payload = body if body is not None else message.decode()
        args = payload.get("args", ()) if isinstance(payload, dict) else payload[0]
        try:
            check_message(task.name, tuple(args or ()))
        except InvalidMessage as exc:
            logger.error("rejected %s: %s", message.headers.get("id", "?"), exc)
            return reject(logger, errors, False)
        return handle(message, body, ack, reject, *rest)

    return task_message_handler
