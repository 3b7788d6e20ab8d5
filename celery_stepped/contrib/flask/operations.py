"""The state-changing requests: complete an outbound action, cancel an open one.

Refused unless the app opted in (``allow_actions=True``), and then only with the token,
compared in constant time. Completing goes through ``stepped.complete`` like any
webhook would, so the tree moves on exactly as when the outside world completes it.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from flask import Response, current_app, jsonify, redirect, request, url_for

from ...models import Action
from ...statuses import FINAL_STATUSES, ActionStatus
from . import params
from .responses import Problem, wants_json

if TYPE_CHECKING:
    from ...extension import Stepped

__all__ = ["TOKEN_CONFIG", "TOKEN_HEADER", "Operations"]

#: The Flask config key holding the token when ``stepped_blueprint(token=...)`` is None.
TOKEN_CONFIG = "STEPPED_ACTION_TOKEN"
#: The request header that may carry the token (else the form field ``token``).
TOKEN_HEADER = "X-Stepped-Token"


class Operations:
    """``POST /actions/<id>/complete`` and ``POST /actions/<id>/cancel``.

    Args:
        stepped: the Stepped instance whose actions are completed.
        allowed: whether the app opted in to state-changing requests.
        token: the token requests must carry; None reads ``app.config``.
    """

    def __init__(self, stepped: Stepped, *, allowed: bool, token: str | None) -> None:
        self.stepped = stepped
        self.allowed = allowed
        self.token = token

    def handle(self, action_id: str, verb: str) -> Response:
        """The view: check method, opt-in, token and action, then complete or cancel."""
        if verb not in ("complete", "cancel"):
            raise Problem(404, f"no such page: /actions/{action_id}/{verb}")
        if request.method != "POST":
            raise Problem(405, f"{verb} changes state: send a POST", {"Allow": "POST"})
        if not self.allowed:
            raise Problem(
                403,
                "this app shows actions read-only: "
                "stepped_blueprint(..., allow_actions=True) turns completing on",
            )
        self.check_token()
        number = params.action_id(action_id)
        status = "cancelled" if verb == "cancel" else params.completion_status(self.field("status"))
        back = params.action_id(request.form.get("back") or str(number))
        self.check_action(number, verb)
        completed = self.stepped.complete(number, status)
        if completed is None:
            raise Problem(409, f"action #{number} finished before this request")
        return self.answer(completed, back)

    def field(self, name: str) -> str | None:
        """A value from the form, or from the JSON body."""
        if name in request.form:
            return request.form[name]
        body = request.get_json(silent=True)
        value = body.get(name) if isinstance(body, dict) else None
        return None if value is None else str(value)

    def check_token(self) -> None:
        """403 unless the request carries the configured token."""
        expected = self.token or current_app.config.get(TOKEN_CONFIG)
        if not expected:
            raise Problem(
                403,
                f"no action token is configured: pass stepped_blueprint(token=...) "
                f"or set app.config[{TOKEN_CONFIG!r}]",
            )
        given = request.headers.get(TOKEN_HEADER) or request.form.get("token") or ""
        if not hmac.compare_digest(given.encode(), str(expected).encode()):
            raise Problem(403, f"wrong or missing token (form field token or {TOKEN_HEADER})")

    def check_action(self, number: int, verb: str) -> None:
        """404 for an unknown action, 409 for one this verb cannot finish."""
        with self.stepped.session_factory() as session:
            action = session.get(Action, number)
            if action is None:
                raise Problem(404, f"no action #{number}")
            status, outbound = action.status, action.outbound
        if status in FINAL_STATUSES:
            raise Problem(409, f"action #{number} is already {status}")
        if verb == "complete" and not (outbound and status == ActionStatus.PERFORMING.value):
            raise Problem(409, f"action #{number} is not a performing outbound action")

    def answer(self, completed: Action, back: int) -> Response:
        """JSON of the completed action, or the tree page of ``back`` (the form's field:
        the tree it was completed from; else the action itself)."""
        if wants_json():
            return jsonify(id=completed.id, name=completed.name, status=completed.status)
        response: Any = redirect(url_for(".tree", action_id=back), code=303)
        return response
