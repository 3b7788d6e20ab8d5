"""Results of root actions in Celery's terms: what ``later()`` returns, and the report.

:class:`ActionResult` is the ``AsyncResult`` of a root's start message (its id is the
root's ``request_id``); it tracks the action: ``state`` reads the result backend and
falls back to the action's row (``PENDING``, ``STARTED``), ``action_id`` finds the
root by its request id.

:class:`RootReport` runs once a root with a request id is final (the
``action_completed`` signal, after the commit): it does what Celery's worker does when
a task returns (``celery.app.trace``) or raises: a success applies the ``link``
callbacks and the rest of a ``chain`` with the final status as their argument, then
``backend.mark_as_done``; any other status ``backend.mark_as_failure`` with
:class:`~celery_stepped.errors.ActionFailed`, which fails the rest of the chain and
calls the ``link_error`` errbacks. Both report a chord member's part to the backend,
so Celery's chord counter sees a real task result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from celery import Celery, states
from celery.app.task import Context
from celery.backends.base import DisabledBackend
from celery.canvas import signature
from celery.result import AsyncResult
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from .errors import ActionFailed
from .models import ACTIONS as _ACTIONS
from .models import Action
from .statuses import ActionStatus

__all__ = ["ActionResult", "Found", "RootReport", "find_request"]

SUCCEEDED = ActionStatus.SUCCEEDED.value


class Found(NamedTuple):
    """A root action found by its request id."""

    id: int
    status: str


def find_request(session_factory: Callable[[], Session], request_id: str) -> Found | None:
    """The root action a start message with ``request_id`` created, if any yet."""
    with session_factory() as s:
        row = s.execute(
            select(Action.id, Action.status).where(Action.request_id == request_id)
        ).first()
    return None if row is None else Found(row.id, row.status)


def celery_state(status: str | None) -> str:
    """The Celery state of an action status: PENDING, STARTED, SUCCESS or FAILURE."""
    if status is None or status == ActionStatus.PENDING.value:
        return states.PENDING
    if status == ActionStatus.PERFORMING.value:
        return states.STARTED
    return states.SUCCESS if status == SUCCEEDED else states.FAILURE


class ActionResult(AsyncResult):
    """The ``AsyncResult`` of a root action's start (``drive.later(car, 5)``).

    ``get()`` needs a result backend: it returns the final status, or raises
    :class:`~celery_stepped.errors.ActionFailed` (``propagate=True``). Without a
    backend, ``state`` still answers from SQL; read the action with
    ``stepped.get_action(result.action_id)``.
    """

    def __init__(self, task_id: str, *, find: Callable[[str], Found | None], **kwargs: Any) -> None:
        super().__init__(task_id, **kwargs)
        self._find = find

    @property
    def action_id(self) -> int | None:
        """The root action's id; None until the start message created it."""
        found = self._find(self.id)
        return None if found is None else found.id

    @property
    def state(self) -> str:
        """The backend's state once the root reported; else the action's, from SQL."""
        state = states.PENDING
        if not isinstance(self.backend, DisabledBackend):
            state = str(super().state)
        if state in states.READY_STATES:
            return state
        found = self._find(self.id)
        return celery_state(None if found is None else found.status)

    status = state


def _request(request_id: str, canvas: dict[str, Any]) -> Context:
    """The request a worker would have had for a task with the root's options."""
    return Context(
        id=request_id,
        chord=canvas.get("chord"),
        group=canvas.get("group_id"),
        group_index=canvas.get("group_index"),
        root_id=canvas.get("root_id") or request_id,
        parent_id=canvas.get("parent_id"),
        callbacks=canvas.get("link"),
        errbacks=canvas.get("link_error"),
        chain=canvas.get("chain"),
        delivery_info={},
        ignore_result=False,
    )


#: ``on_completed`` without a ``root`` keyword: it reads the row.
_UNKNOWN: Any = object()
#: Asked for every completed action, children included: prebuilt Core, as it is hot.
_ROOT_OF = select(_ACTIONS.c.root, _ACTIONS.c.request_id, _ACTIONS.c.canvas).where(
    _ACTIONS.c.id == bindparam("b_action")
)


class RootReport:
    """Reports final roots with a request id to Celery: callbacks, chain, result."""

    def __init__(self, app: Celery, session_factory: Callable[[], Session]) -> None:
        self.app = app
        self.session_factory = session_factory

    def on_completed(
        self,
        sender: Any = None,
        action_id: int = 0,
        status: str = "",
        root: Any = _UNKNOWN,
        **_: Any,
    ) -> None:
        """``signals.action_completed`` receiver: report the action if it is such a root
        (``root``: its request id and canvas, when the sender read them; None: not one)."""
        if root is not _UNKNOWN:
            if root is not None:
                self.report(root[0], status, action_id, root[1])
            return
        with self.session_factory() as s:
            row = s.execute(_ROOT_OF, {"b_action": action_id}).first()
        if row is not None and row.root and row.request_id:
            self.report(row.request_id, status, action_id, row.canvas or {})

    def on_short_circuit(
        self,
        sender: Any = None,
        status: str = "",
        request_id: str | None = None,
        canvas: dict[str, Any] | None = None,
        **_: Any,
    ) -> None:
        """``signals.action_short_circuited`` receiver: a root that never persisted."""
        if request_id:
            self.report(request_id, status, None, canvas or {})

    def on_revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        """``task_revoked`` receiver for ``stepped.start``: a root whose start message
        expired (or was revoked) before it created the action ends ``cancelled``."""
        args = list(getattr(request, "args", None) or [])
        payload = args[0] if args and isinstance(args[0], dict) else {}
        request_id = payload.get("request")
        if not request_id or payload.get("link") is not None:
            return
        if find_request(self.session_factory, request_id) is None:
            cancelled = ActionStatus.CANCELLED.value
            self.report(request_id, cancelled, None, payload.get("canvas") or {})

    def report(
        self, request_id: str, status: str, action_id: int | None, canvas: dict[str, Any]
    ) -> None:
        """Store the root's outcome under its request id, as a task of that id would."""
        request = _request(request_id, canvas)
        backend = self.app.backend
        if status == SUCCEEDED:
            self._dispatch(status, request, canvas.get("priority"))
            backend.mark_as_done(request_id, status, request=request)
            return
        error = ActionFailed(status, action_id)
        backend.mark_as_failure(request_id, error, traceback=None, request=request)

    def _dispatch(self, retval: Any, request: Context, priority: int | None) -> None:
        """``link`` callbacks, then the next task of the chain (celery.app.trace)."""
        options = {"parent_id": request.id, "root_id": request.root_id, "priority": priority}
        for callback in request.callbacks or []:
            signature(callback, app=self.app).apply_async((retval,), **options)
        chain = request.chain
        if chain:
            next_task = signature(chain[-1], app=self.app)
            next_task.apply_async((retval,), chain=chain[:-1], **options)
