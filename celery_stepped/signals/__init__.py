"""Signals sent by celery_stepped (Celery's ``Signal`` class: a failing receiver is logged).

Connect with ``signals.action_completed.connect(receiver)``; every signal's sender is
the :class:`~celery_stepped.Stepped` instance.

- ``action_started(action_id, name)``: an action went from pending to performing.
- ``action_completed(action_id, status)``: an action reached a final status (after
  its after callbacks ran). When the transition read it with the status, the keyword
  ``root`` is also given: ``(request_id, canvas)`` for a root started with a request
  id (``later()``, a signature), None for any other action.
- ``action_short_circuited(name, status, request_id, canvas)``: an action ended before
  it was persisted (cancelled or completed in ``before``, skipped by an achievement);
  ``request_id`` and ``canvas`` (its Celery callbacks) are set for a root from ``later()``.
- ``step_started(action_id, index)``: a step body committed.
- ``step_completed(step_id, status)``: a step closed, exactly once per step.
- ``exception_handled(exception, action_id, step_index, block)``: an exception of a
  handled class was turned into failure; ``block`` is ``step``, ``before``, ``keys``,
  ``lane`` or ``after_<status>``.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = [
    "action_completed",
    "action_short_circuited",
    "action_started",
    "exception_handled",
    "step_completed",
    "step_started",
]

action_started = Signal(name="stepped.action_started", providing_args={"action_id", "name"})
action_completed = Signal(name="stepped.action_completed", providing_args={"action_id", "status"})
action_short_circuited = Signal(
    name="stepped.action_short_circuited",
    providing_args={"name", "status", "request_id", "canvas"},
)
step_started = Signal(name="stepped.step_started", providing_args={"action_id", "index"})
step_completed = Signal(name="stepped.step_completed", providing_args={"step_id", "status"})
exception_handled = Signal(
    name="stepped.exception_handled",
    providing_args={"exception", "action_id", "step_index", "block"},
)
