"""A Flask blueprint that shows Stepped's action trees, live, and their lanes.

::

    from celery_stepped.contrib.flask import stepped_blueprint

    app.register_blueprint(stepped_blueprint(stepped))  # pages under /stepped

Pages (each also as JSON: ``Accept: application/json`` or a ``.json`` suffix):

- ``/stepped/actions``: recent root actions, newest first, filtered by ``status``,
  ``name`` and ``actor``, paginated (``page``, ``per_page``), with counts per status;
- ``/stepped/actions/<id>``: one action's tree, which updates itself while anything in
  it is not final;
- ``/stepped/lanes``: every lane's current and pending actions, with ages.

Read-only unless the app opts in with ``allow_actions=True``: then
``POST /stepped/actions/<id>/complete`` (an outbound action, form field ``status``) and
``POST /stepped/actions/<id>/cancel`` change state, given the token (``token=`` or
``app.config["STEPPED_ACTION_TOKEN"]``) as the form field ``token`` or the
``X-Stepped-Token`` header. Templates, CSS and JavaScript ship in the package: no build
step, no CDN.
"""

from __future__ import annotations

from .blueprint import stepped_blueprint

__all__ = ["stepped_blueprint"]
