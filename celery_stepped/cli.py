"""``celery -A app stepped ...``: look at and operate Stepped from the command line.

Installed through Celery's ``celery.commands`` entry point, so every subcommand gets the
app of ``-A`` (``ctx.obj.app``) and its Stepped instance (``app.stepped``):

- ``migrate`` applies the shipped Alembic migrations;
- ``tree ID`` prints one action's tree: status, timings, steps and their members;
- ``lanes`` prints every lane: the current action and the pending ones, with ages;
- ``actions`` lists actions, newest first, filtered by status and name;
- ``repair`` rebuilds lanes and in-flight steps from SQL after Redis lost its data.

Output is drawn with ``rich`` on a terminal and is plain text otherwise; ``--json``
prints machine-readable JSON. The functions that load and draw trees
(:func:`action_trees`, :func:`tree_lines`, :func:`rich_tree`) are public so that
programs (the example in ``examples/plain``) show trees exactly as the CLI does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from .errors import ActionNotFound, SteppedError
from .models import Action, ParentLink, Step
from .statuses import ActionStatus

if TYPE_CHECKING:
    from rich.console import Console
    from rich.tree import Tree

    from .extension import Stepped

__all__ = [
    "action_rows",
    "action_tree",
    "action_trees",
    "lane_rows",
    "rich_tree",
    "stepped",
    "tree_lines",
]

Labels = Mapping[tuple[str, str], str]
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


# -- loading ----------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _seconds(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return round(((end or now) - start).total_seconds(), 3)


@dataclass
class _Loaded:
    actions: dict[int, Action] = field(default_factory=dict)
    links: dict[int, list[ParentLink]] = field(default_factory=dict)


def _load(session: Session, root_ids: Iterable[int]) -> _Loaded:
    """Every action, step and parent link reachable from the roots, level by level."""
    loaded = _Loaded()
    frontier = set(root_ids)
    while frontier:
        ids = sorted(frontier)
        for action in session.scalars(select(Action).where(Action.id.in_(ids))):
            loaded.actions[action.id] = action
        step_ids = [s.id for i in ids if i in loaded.actions for s in loaded.actions[i].steps]
        links = session.scalars(
            select(ParentLink).where(ParentLink.step_id.in_(step_ids)).order_by(ParentLink.id)
        ).all()
        for link in links:
            loaded.links.setdefault(link.step_id, []).append(link)
        frontier = {
            link.action_id
            for link in links
            if link.action_id is not None and link.action_id not in loaded.actions
        }
    return loaded


def _definition_facts(
    stepped: Stepped, actor_type: str, name: str
) -> tuple[list[str] | None, bool]:
    """Step names of a definition and whether it has a checksum (None: not defined here)."""
    try:
        definition = stepped.definition_for(actor_type, name)
    except (SteppedError, LookupError, TypeError):
        return None, False
    names = [getattr(b, "__name__", "step").lstrip("_") for b in definition.steps_for_run()]
    return names, definition.resolved("checksum_fn") is not None


class _TreeBuilder:
    """Turns loaded rows into the JSON-ready nodes of :func:`action_trees`."""

    def __init__(self, stepped: Stepped, loaded: _Loaded, now: datetime) -> None:
        self.stepped = stepped
        self.loaded = loaded
        self.now = now

    def definition_facts(self, actor_type: str, name: str) -> tuple[list[str] | None, bool]:
        return _definition_facts(self.stepped, actor_type, name)

    def node(self, action_id: int, path: frozenset[int] = frozenset()) -> dict[str, Any]:
        action = self.loaded.actions[action_id]
        step_names, _ = self.definition_facts(action.actor_type, action.name)
        path = path | {action_id}
        return {
            "id": action.id,
            "name": action.name,
            "actor": f"{action.actor_type}/{action.actor_id}",
            "arguments": action.arguments,
            "status": action.status,
            "root": action.root,
            "outbound": action.outbound,
            "job": action.job,
            "concurrency_key": action.concurrency_key,
            "checksum_key": action.checksum_key,
            "checksum": action.checksum,
            "current_step_index": action.current_step_index,
            "step_count": None if step_names is None else len(step_names),
            "timeout_seconds": action.timeout_seconds,
            "created_at": _iso(action.created_at),
            "started_at": _iso(action.started_at),
            "completed_at": _iso(action.completed_at),
            "duration_seconds": _seconds(action.started_at, action.completed_at, self.now),
            "after_callbacks_succeeded_count": action.after_callbacks_succeeded_count,
            "after_callbacks_failed_count": action.after_callbacks_failed_count,
            "steps": [self.step(s, step_names, path) for s in action.steps],
        }

    def step(self, step: Step, names: Sequence[str] | None, path: frozenset[int]) -> dict[str, Any]:
        index = step.definition_index
        return {
            "index": index,
            "name": names[index] if names is not None and index < len(names) else None,
            "status": step.status,
            "started_at": _iso(step.started_at),
            "completed_at": _iso(step.completed_at),
            "duration_seconds": _seconds(step.started_at, step.completed_at, self.now),
            "pending_members": step.pending_actions_count,
            "unsuccessful_members": step.unsuccessful_actions_count,
            "members": [self.member(link, path) for link in self.loaded.links.get(step.id, [])],
        }

    def member(self, link: ParentLink, path: frozenset[int]) -> dict[str, Any]:
        call = dict(link.call or {})
        base = {"kind": link.kind, "state": link.state, "outcome": link.outcome}
        if link.kind == "wait":
            return {**base, "seconds": call.get("seconds")}
        actor = call.get("actor") or ["?", "?"]
        member = {**base, "name": call.get("name"), "actor": f"{actor[0]}/{actor[1]}"}
        if link.action_id is None:
            _, has_checksum = self.definition_facts(str(actor[0]), str(call.get("name")))
            member["skipped"] = link.state == "done"
            member["reason"] = _skip_reason(link.outcome, has_checksum) if link.outcome else None
            return {**member, "action": None}
        if link.action_id in path or link.action_id not in self.loaded.actions:
            return {**member, "action": {"id": link.action_id, "cycle": True}}
        return {**member, "action": self.node(link.action_id, path)}


def _skip_reason(outcome: str, has_checksum: bool) -> str:
    if outcome == ActionStatus.SUCCEEDED.value:
        return "already achieved" if has_checksum else "completed in before"
    return f"{outcome} in before"


def action_trees(stepped: Stepped, action_ids: Sequence[int]) -> list[dict[str, Any]]:
    """JSON-ready trees of the given actions (unknown ids are left out).

    Each node holds the action's columns, ``duration_seconds`` (completed or now, minus
    started), ``step_count`` and ``steps``; each step its ``members`` in the order the
    step started them: ``{"kind": "wait", "seconds", "state"}`` or ``{"kind": "action",
    "name", "actor", "state", "outcome", "action": <node> | None}``. A member whose
    action never persisted (a checksum already achieved, a ``before`` that completed or
    cancelled it) has ``"action": None`` and ``"skipped": True``.
    """
    now = stepped.clock()
    with stepped.session_factory() as session:
        loaded = _load(session, action_ids)
        builder = _TreeBuilder(stepped, loaded, now)
        return [builder.node(i) for i in action_ids if i in loaded.actions]


def action_tree(stepped: Stepped, action_id: int) -> dict[str, Any]:
    """The tree of one action (see :func:`action_trees`); ActionNotFound if none."""
    trees = action_trees(stepped, [action_id])
    if not trees:
        raise ActionNotFound(f"no action with id {action_id}")
    return trees[0]


def _brief(action: Action | None, now: datetime) -> dict[str, Any] | None:
    if action is None:
        return None
    since = action.started_at if action.status == "performing" else action.created_at
    return {
        "id": action.id,
        "name": action.name,
        "actor": f"{action.actor_type}/{action.actor_id}",
        "status": action.status,
        "age_seconds": _seconds(since, None, now),
    }


def lane_rows(stepped: Stepped) -> list[dict[str, Any]]:
    """Every lane: ``key``, ``current`` and ``pending`` actions with their ages.

    The age of the current action counts from its start, that of a pending one from its
    creation. An id Redis knows but SQL does not shows as ``{"id": .., "missing": True}``.
    """
    lanes = stepped.lanes.all()
    ids = {i for lane in lanes for i in [lane.current_id, *lane.pending_ids] if i is not None}
    now = stepped.clock()
    with stepped.session_factory() as session:
        actions = {a.id: a for a in session.scalars(select(Action).where(Action.id.in_(ids)))}

        def brief(i: int) -> dict[str, Any]:
            return _brief(actions.get(i), now) or {"id": i, "missing": True}

        return [
            {
                "key": lane.key,
                "current": None if lane.current_id is None else brief(lane.current_id),
                "pending": [brief(i) for i in lane.pending_ids],
            }
            for lane in lanes
        ]


def action_rows(
    stepped: Stepped,
    *,
    statuses: Sequence[str] = (),
    name: str | None = None,
    limit: int = 50,
    roots_only: bool = False,
) -> list[dict[str, Any]]:
    """Actions newest first, filtered by status(es), name and rootness."""
    query = select(Action).order_by(Action.id.desc()).limit(limit)
    if statuses:
        query = query.where(Action.status.in_(list(statuses)))
    if name:
        query = query.where(Action.name == name)
    if roots_only:
        query = query.where(Action.root.is_(True))
    now = stepped.clock()
    counts: dict[tuple[str, str], int | None] = {}

    def step_count(a: Action) -> int | None:
        if (a.actor_type, a.name) not in counts:
            names = _definition_facts(stepped, a.actor_type, a.name)[0]
            counts[(a.actor_type, a.name)] = None if names is None else len(names)
        return counts[(a.actor_type, a.name)]

    with stepped.session_factory() as session:
        return [
            {
                "id": a.id,
                "name": a.name,
                "actor": f"{a.actor_type}/{a.actor_id}",
                "status": a.status,
                "root": a.root,
                "current_step_index": a.current_step_index,
                "step_count": step_count(a),
                "created_at": _iso(a.created_at),
                "started_at": _iso(a.started_at),
                "completed_at": _iso(a.completed_at),
                "duration_seconds": _seconds(a.started_at, a.completed_at, now),
            }
            for a in session.scalars(query)
        ]


# -- drawing trees -------------------------------------------------------------------------


@dataclass
class _Line:
    text: str
    status: str
    children: list[_Line] = field(default_factory=list)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}min"


def _args_text(arguments: Any) -> str:
    def short(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"__stepped_actor__"}:
            return "/".join(str(v) for v in value["__stepped_actor__"])
        return value

    if not arguments:
        return ""
    text = ", ".join(json.dumps(short(a), ensure_ascii=False) for a in arguments)
    return f"({text[:60]}{'…' if len(text) > 60 else ''})"


def _step_label(node: dict[str, Any], index: int, name: str | None) -> str:
    count = node.get("step_count")
    total = f"/{count}" if count else ""
    return f"step {index + 1}{total}{f' {name}' if name else ''}"


def _actor_text(actor: str, labels: Labels | None) -> str:
    actor_type, _, actor_id = actor.partition("/")
    label = (labels or {}).get((actor_type, actor_id))
    return f"{actor} [{label}]" if label else actor


def _action_text(node: dict[str, Any], labels: Labels | None) -> str:
    actor = _actor_text(node["actor"], labels)
    head = f"#{node['id']} {node['name']}{_args_text(node['arguments'])} on {actor}"
    status, seconds = node["status"], node["duration_seconds"]
    if status == "performing":
        steps = node["steps"]
        at = steps[-1] if steps else None
        where = f", at {_step_label(node, at['index'], at['name'])}" if at else ""
        tail = f"performing for {_duration(seconds)}{where}"
        if node["outbound"] and at and at["status"] != "performing":
            tail += ", waiting to be completed from outside"
        return f"{head}: {tail}"
    if status == "pending":
        return f"{head}: pending in lane {node['concurrency_key']}"
    done = f" in {_duration(seconds)}" if seconds is not None else ""
    extra = ""
    if node["after_callbacks_failed_count"]:
        extra = f" ({node['after_callbacks_failed_count']} after callback(s) failed)"
    return f"{head}: {status}{done}{extra}"


def _step_text(node: dict[str, Any], step: dict[str, Any]) -> str:
    text = f"{_step_label(node, step['index'], step['name'])}: {step['status']}"
    total = len(step["members"])
    if step["status"] == "performing":
        return f"{text}, waiting on {step['pending_members']} of {total}" if total else text
    text += f" in {_duration(step['duration_seconds'])}"
    if step["unsuccessful_members"]:
        text += f" ({step['unsuccessful_members']} of {total} unsuccessful)"
    return text


def _member_line(member: dict[str, Any], labels: Labels | None, compact: bool) -> _Line:
    if member["kind"] == "wait":
        state = "done" if member["state"] == "done" else "waiting"
        return _Line(f"wait {member['seconds']:g}s: {state}", state)
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


def _node_line(node: dict[str, Any], labels: Labels | None, compact: bool) -> _Line:
    line = _Line(_action_text(node, labels), node["status"])
    for step in node["steps"]:
        members = [_member_line(m, labels, compact) for m in step["members"]]
        if compact and not node["root"] and _collapsible(step):
            continue
        line.children.append(_Line(_step_text(node, step), step["status"], members))
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
    """A tree of :func:`action_trees` as plain text lines.

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


# -- the commands ---------------------------------------------------------------------------


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


def _console(ctx: click.Context) -> Console | None:
    """A rich console when stdout is a terminal, else None (plain text)."""
    from rich.console import Console

    no_color = bool(getattr(ctx.find_root().obj, "no_color", False))
    console = Console(no_color=no_color or None, highlight=False)
    return console if console.is_terminal else None


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return [line.rstrip() for line in lines]


def _show_table(
    ctx: click.Context, title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    console = _console(ctx)
    if console is None:
        for line in _table(headers, rows):
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
def migrate(ctx: click.Context, revision: str) -> None:
    """Apply the shipped Alembic migrations to the Stepped database."""
    instance = _stepped(ctx)
    instance.migrate(revision)
    url = instance.engine.url.render_as_string(hide_password=True)
    click.echo(f"Stepped tables of {url} migrated to {revision}.")


@stepped.command()
@click.argument("action_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@click.pass_context
def tree(ctx: click.Context, action_id: int, as_json: bool) -> None:
    """Show one action's tree: status, timings, steps and their children.

    Steps are numbered from 1 in text; in JSON, index and current_step_index count
    from 0.
    """
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


def _age(brief: Mapping[str, Any] | None) -> str:
    if brief is None:
        return "-"
    if brief.get("missing"):
        return f"#{brief['id']} (not in SQL)"
    age = _duration(brief["age_seconds"])
    return f"#{brief['id']} {brief['name']} {brief['actor']} {brief['status']} {age}".rstrip()


@stepped.command()
@click.option("--json", "as_json", is_flag=True, help="Print the lanes as JSON.")
@click.pass_context
def lanes(ctx: click.Context, as_json: bool) -> None:
    """Show every lane: its current action and the pending ones, with ages."""
    rows = lane_rows(_stepped(ctx))
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo("No lanes: nothing is performing or pending.")
        return
    table = [
        (r["key"], _age(r["current"]), ", ".join(_age(p) for p in r["pending"]) or "-")
        for r in rows
    ]
    _show_table(ctx, f"{len(rows)} lane(s)", ("LANE", "CURRENT", "PENDING"), table)


def _step_of(index: int, count: int | None) -> str:
    """``3/5``: the step an action is at (its last one once it finished)."""
    if count is None:
        return str(index + 1)
    return f"{min(index + 1, count)}/{count}"


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
def actions(
    ctx: click.Context,
    statuses: tuple[str, ...],
    name: str | None,
    roots: bool,
    limit: int,
    as_json: bool,
) -> None:
    """List actions, newest first."""
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
            _step_of(r["current_step_index"], r["step_count"]) if r["started_at"] else "-",
            "yes" if r["root"] else "",
            (r["created_at"] or "")[:19].replace("T", " "),
            _duration(r["duration_seconds"]),
        )
        for r in rows
    ]
    headers = ("ID", "NAME", "ACTOR", "STATUS", "STEP", "ROOT", "CREATED (UTC)", "DURATION")
    _show_table(ctx, f"{len(rows)} action(s)", headers, table)


@stepped.command()
@click.option("--apply", "apply_", is_flag=True, help="Make the changes (default: dry run).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
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
