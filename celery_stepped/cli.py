"""``celery -A app stepped ...``: look at and operate Stepped from the command line.

Installed through Celery's ``celery.commands`` entry point, so every subcommand gets the
app of ``-A`` (``ctx.obj.app``) and its Stepped instance (``app.stepped``):

- ``migrate`` applies the shipped Alembic migrations;
- ``tree ID`` prints one action's tree: status, timings, steps and their members;
- ``lanes`` prints every lane: the current action and the pending ones, with ages;
- ``actions`` lists actions, newest first, filtered by status and name;
- ``repair`` rebuilds lanes and in-flight steps from SQL after Redis lost its data.

Output is drawn with ``rich`` on a terminal and is plain text otherwise; ``--json``
prints machine-readable JSON. The data comes from :mod:`celery_stepped.views` and is
drawn by :mod:`celery_stepped.rendering`. Every ``celery`` command imports this module
(the entry point), so it imports only click at the top and the rest inside commands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec

import click

from .statuses import ActionStatus

if TYPE_CHECKING:
    from rich.console import Console

    from .extension import Stepped

__all__ = ["stepped"]

P = ParamSpec("P")


def _stepped(ctx: click.Context) -> Stepped:
    obj = ctx.find_root().obj or ctx.obj
    app = getattr(obj, "app", None)
    instance = getattr(app, "stepped", None)
    if instance is None:
        raise click.UsageError(
            "the app given with -A has no Stepped instance: create Stepped(app, ...) "
            "in the module that defines the app"
        )
    return instance


def _app_name(ctx: click.Context) -> str:
    """The ``-A`` value the command ran with (the app's name when run without it)."""
    given = ctx.find_root().params.get("app")
    if isinstance(given, str) and given:
        return given
    app = getattr(ctx.find_root().obj or ctx.obj, "app", None)
    return str(getattr(app, "main", None) or "app")


def _answers(command: Callable[P, None]) -> Callable[P, None]:
    """Errors a person can fix end the command with one line and exit code 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            command(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as exc:
            from .diagnosis import diagnose

            ctx = click.get_current_context()
            message = diagnose(_stepped(ctx), exc, app_name=_app_name(ctx))
            if message is None:
                raise
            raise click.ClickException(message) from exc

    return run


def _console(ctx: click.Context) -> Console | None:
    """A rich console when stdout is a terminal, else None (plain text)."""
    from rich.console import Console

    no_color = bool(getattr(ctx.find_root().obj, "no_color", False))
    console = Console(no_color=no_color or None, highlight=False)
    return console if console.is_terminal else None


def _emit_json(value: Any) -> None:
    import json

    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _show_table(
    ctx: click.Context, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    from .rendering import table_lines

    console = _console(ctx)
    if console is None:
        for line in table_lines(headers, rows):
            click.echo(line)
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    console.print(table)


@click.group(name="stepped")
def stepped() -> None:
    """Stepped: workflows as persisted trees of actions (migrate, inspect, repair)."""


@stepped.command()
@click.option("--revision", default="head", show_default=True, help="Alembic revision.")
@click.pass_context
@_answers
def migrate(ctx: click.Context, revision: str) -> None:
    """Apply the shipped Alembic migrations to the Stepped database."""
    from alembic.util import CommandError

    from .models.migrations import revisions

    instance = _stepped(ctx)
    try:
        instance.migrate(revision)
    except CommandError as exc:
        shipped = ", ".join(revisions())
        if "Can't locate revision" in str(exc):
            message = f"unknown revision {revision!r}: the shipped ones are {shipped} (or head)"
        else:
            message = f"cannot migrate to {revision!r}: {exc} (shipped revisions: {shipped})"
        raise click.ClickException(message) from exc
    url = instance.engine.url.render_as_string(hide_password=True)
    click.echo(f"Stepped tables of {url} migrated to {revision}.")


@stepped.command()
@click.argument("action_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@click.pass_context
@_answers
def tree(ctx: click.Context, action_id: int, as_json: bool) -> None:
    """Show one action's tree: status, timings, steps and their children.

    Steps are numbered from 1 ("step 2/3"), as "number" in JSON; JSON's "index" and
    "current_step_index" are the 0-based positions in the definition.
    """
    from .errors import ActionNotFound
    from .rendering import rich_tree, tree_lines
    from .views import action_tree

    instance = _stepped(ctx)
    try:
        node = action_tree(instance, action_id)
    except ActionNotFound as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        _emit_json(node)
        return
    console = _console(ctx)
    if console is not None:
        console.print(rich_tree(node))
        return
    for line in tree_lines(node):
        click.echo(line)


@stepped.command()
@click.option("--json", "as_json", is_flag=True, help="Print the lanes as JSON.")
@click.pass_context
@_answers
def lanes(ctx: click.Context, as_json: bool) -> None:
    """Show every lane: its current action and the pending ones, with ages."""
    from .rendering import brief_text
    from .views import lane_rows

    rows = lane_rows(_stepped(ctx))
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No lanes: nothing is performing or pending.")
        return
    table = [
        (r["key"], brief_text(r["current"]), ", ".join(brief_text(p) for p in r["pending"]) or "-")
        for r in rows
    ]
    _show_table(ctx, f"{len(rows)} lane(s)", ("LANE", "CURRENT", "PENDING"), table)


@stepped.command()
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice([s.value for s in ActionStatus]),
    help="Only actions in this status (repeatable).",
)
@click.option("--name", default=None, help="Only actions of this name.")
@click.option("--roots", is_flag=True, help="Only root actions.")
@click.option(
    "--limit",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    metavar="K",
    help="At most K rows.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the actions as JSON.")
@click.pass_context
@_answers
def actions(
    ctx: click.Context,
    statuses: tuple[str, ...],
    name: str | None,
    roots: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List actions, newest first."""
    from .rendering import duration_text, step_position
    from .views import action_rows

    rows = action_rows(_stepped(ctx), statuses=statuses, name=name, limit=limit, roots_only=roots)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No actions match.")
        return
    table = [
        (
            str(r["id"]),
            r["name"],
            r["actor"],
            r["status"],
            step_position(r["current_step_number"], r["step_count"]),
            "yes" if r["root"] else "",
            (r["created_at"] or "")[:19].replace("T", " "),
            duration_text(r["duration_seconds"]),
        )
        for r in rows
    ]
    headers = ("ID", "NAME", "ACTOR", "STATUS", "STEP", "ROOT", "CREATED (UTC)", "DURATION")
    _show_table(ctx, f"{len(rows)} action(s)", headers, table)


@stepped.command()
@click.option("--apply", "apply_", is_flag=True, help="Make the changes (default: dry run).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
@_answers
def repair(ctx: click.Context, apply_: bool, as_json: bool) -> None:
    """Rebuild lanes and in-flight steps from SQL after Redis lost its data.

    Without --apply it only reports what it would do.
    """
    report = _stepped(ctx).repair(apply=apply_)
    if as_json:
        _emit_json(report.to_dict())
        return
    lines = list(report.lines)
    for line in lines:
        click.echo(line)
    if not lines:
        click.echo("Nothing to repair: lanes and steps agree with SQL.")
    elif not apply_:
        click.echo("Dry run: run again with --apply to make these changes.")
