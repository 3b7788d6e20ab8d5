"""``stepped_blueprint``: the routes, wired to the read model of :mod:`celery_stepped.views`.

Every page reads through ``celery_stepped.views`` (the functions the command line uses
too) and answers HTML or JSON (:mod:`.responses`); unknown paths under the prefix and
bad input answer 4xx in the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, redirect, request, url_for
from werkzeug.exceptions import HTTPException

from ...errors import ActionNotFound
from ...views import action_tree, lane_rows, root_rows
from . import params
from .operations import TOKEN_HEADER, Operations
from .presenting import is_final, template_helpers, with_shared_marked
from .responses import Problem, error_response, http_error_response, page
from .sharing import parents_of

if TYPE_CHECKING:
    from ...extension import Stepped

__all__ = ["POLL_SECONDS", "stepped_blueprint"]

#: How often an open tree page asks for its JSON.
POLL_SECONDS = 1.0
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


class Pages:
    """The read-only views: the index of root actions, one tree, the lanes."""

    def __init__(self, stepped: Stepped, *, allow_actions: bool) -> None:
        self.stepped = stepped
        self.allow_actions = allow_actions

    def home(self) -> Response:
        """``/``: the index."""
        query: dict[str, Any] = request.args.to_dict()
        response: Any = redirect(url_for(".index", **query))
        return response

    def index(self) -> Response:
        """Root actions, newest first, filtered and paginated, with counts per status."""
        filters = params.index_filters(request.args)
        try:
            rows = root_rows(self.stepped, **filters)
        except ValueError as exc:
            raise Problem(400, str(exc)) from exc
        return page("stepped/index.html", rows, filters=filters, link=_index_link(filters))

    def tree(self, action_id: str) -> Response:
        """One action's tree; the HTML page polls the JSON while anything is open."""
        number = params.action_id(action_id)
        try:
            node = action_tree(self.stepped, number)
        except ActionNotFound as exc:
            raise Problem(404, f"no action #{number}") from exc
        shown, ids = with_shared_marked(node)
        return page(
            "stepped/tree.html",
            node,
            shown=shown,
            ids=ids,
            parents=parents_of(self.stepped, ids),
            live=not is_final(node),
            poll_seconds=POLL_SECONDS,
            allow_actions=self.allow_actions,
            token_header=TOKEN_HEADER,
        )

    def lanes(self) -> Response:
        """Every lane: its current action and the pending ones, with ages."""
        return page("stepped/lanes.html", {"lanes": lane_rows(self.stepped)})

    def missing(self, rest: str) -> Response:
        """Any other path under the prefix: a 404, or a 405 for a page that exists but
        only answers GET, in the format asked for."""
        if request.method not in ("GET", "HEAD"):
            adapter = current_app.url_map.bind_to_environ(request.environ)
            try:
                endpoint, _ = adapter.match(method="GET")
            except HTTPException:
                endpoint = request.endpoint
            if endpoint != request.endpoint:
                raise Problem(405, f"{request.method} is not allowed here", {"Allow": "GET"})
        raise Problem(404, f"no such page: /{rest}")


def _index_link(filters: dict[str, Any]) -> Callable[..., str]:
    """``link(**changes)``: the URL of the index with these filters changed (``json=True``:
    its JSON), leaving out empty filters and defaults."""

    def link(json: bool = False, **changes: Any) -> str:
        merged = {**filters, **changes}
        defaults = {"page": 1, "per_page": params.PER_PAGE}
        query = {k: v for k, v in merged.items() if v is not None and defaults.get(k) != v}
        return url_for(".index_json" if json else ".index", **query)

    return link


def _no_store(response: Response) -> Response:
    """Pages show live state: never cached. No inline script or style is needed."""
    response.headers.setdefault("Cache-Control", "no-store")
    if response.mimetype == "text/html":
        response.headers.setdefault(
            "Content-Security-Policy", "default-src 'self'; frame-ancestors 'self'"
        )
    return response


def stepped_blueprint(
    stepped: Stepped,
    url_prefix: str = "/stepped",
    *,
    allow_actions: bool = False,
    token: str | None = None,
) -> Blueprint:
    """A Flask blueprint showing the action trees and lanes of ``stepped``.

    Args:
        stepped: the Stepped instance to show.
        url_prefix: where the pages live.
        allow_actions: accept POSTs that complete or cancel actions (off: 403).
        token: the token such POSTs must carry; None reads
            ``app.config["STEPPED_ACTION_TOKEN"]`` at request time.

    Returns:
        The blueprint, named ``stepped``; register it with ``app.register_blueprint``.
    """
    bp = Blueprint(
        "stepped",
        __name__,
        url_prefix=url_prefix,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )
    _add_routes(
        bp,
        Pages(stepped, allow_actions=allow_actions),
        Operations(stepped, allowed=allow_actions, token=token),
    )
    bp.register_error_handler(Problem, error_response)
    bp.register_error_handler(HTTPException, http_error_response)
    bp.context_processor(template_helpers)
    bp.after_request(_no_store)
    return bp


def _add_routes(bp: Blueprint, pages: Pages, operations: Operations) -> None:
    """Every URL of the blueprint; ``/<path:rest>`` answers the rest (404 or 405)."""
    bp.add_url_rule("/", "home", pages.home)
    for suffix, endpoint in (("", ""), (".json", "_json")):
        bp.add_url_rule(f"/actions{suffix}", f"index{endpoint}", pages.index)
        bp.add_url_rule(f"/lanes{suffix}", f"lanes{endpoint}", pages.lanes)
    bp.add_url_rule("/actions/<action_id>", "tree", pages.tree)
    bp.add_url_rule(
        "/actions/<action_id>/<verb>", "operate", operations.handle, methods=["GET", "POST"]
    )
    bp.add_url_rule("/<path:rest>", "missing", pages.missing, methods=ALL_METHODS)
