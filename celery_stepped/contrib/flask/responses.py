"""Answers in the format a request asks for: a page as HTML or JSON, an error as either.

A request wants JSON when its path ends in ``.json``, when ``application/json`` is its
best ``Accept`` match against ``text/html`` (a browser's ``*/*`` picks HTML), or, for a
POST, when it sends JSON. Every 4xx the blueprint answers goes through :class:`Problem`,
so an API client never receives an HTML error page and a person never receives JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from flask import Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

__all__ = ["Problem", "error_response", "http_error_response", "page", "wants_json"]

JSON = "application/json"
HTML = "text/html"


class Problem(Exception):
    """A request the blueprint refuses: an HTTP status (4xx) and a message for people.

    Args:
        status: the HTTP status code.
        message: what went wrong, in one sentence.
        headers: extra response headers (``Allow`` for a 405).
    """

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


def wants_json() -> bool:
    """True when the current request should be answered with JSON."""
    if request.path.endswith(".json"):
        return True
    if request.method == "POST" and request.is_json:
        return True
    return request.accept_mimetypes.best_match([HTML, JSON]) == JSON


def page(template: str, data: Any, **context: Any) -> Response:
    """``data`` as JSON, or ``template`` rendered with ``data`` and ``context``."""
    if wants_json():
        response = jsonify(data)
    else:
        response = Response(render_template(template, data=data, **context), mimetype=HTML)
    response.vary.add("Accept")
    return response


def error_response(problem: Problem) -> Response:
    """The error page or JSON body (``{"error": message, "status": code}``) of a Problem."""
    if wants_json():
        response = jsonify(error=problem.message, status=problem.status)
    else:
        phrase = HTTPStatus(problem.status).phrase
        html = render_template(
            "stepped/error.html", status=problem.status, phrase=phrase, message=problem.message
        )
        response = Response(html, mimetype=HTML)
    response.status_code = problem.status
    response.headers.update(problem.headers)
    response.vary.add("Accept")
    return response


def http_error_response(error: HTTPException) -> Response:
    """Werkzeug's own 4xx errors raised inside a view (a malformed form, a too large
    body), answered like every other Problem."""
    code = error.code or 400
    message = error.description or error.name
    headers = {k: v for k, v in error.get_headers() if k.lower() == "allow"}
    return error_response(Problem(code, str(message), headers))
