"""The soak's audit: after the drain, what SQL, Redis and the outbox say.

- ``stuck``: actions not final, steps still performing, members still waited on, lanes
  left in Redis, messages left unsent in the outbox table;
- ``lost``: roots the driver started that have no row, steps whose body's side effect is
  missing, superseded actions whose waiting parents were not attached to a superseder,
  steps whose join count differs from their members' outcomes;
- ``duplicated``: side effects applied more than once, or for no step.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, select

from celery_stepped import Stepped
from celery_stepped.models import Action, OutboxEntry, ParentLink, Step
from celery_stepped.statuses import FINAL_STATUSES
from tests.soak.soak_app import Effect


@dataclass
class Findings:
    """What the audit found, by kind: a list of one-line descriptions each."""

    actions: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)

    def sample(self) -> str:
        """The first findings of each kind (for the assertion message)."""
        parts = [*self.lost[:10], *self.duplicated[:10], *self.stuck[:10]]
        return "\n".join(parts)


def audit(stepped: Stepped, requests: list[str]) -> Findings:
    """Audit the soak's database and lanes."""
    found = Findings()
    with stepped.session() as s:
        actions = {a.id: a for a in s.scalars(select(Action))}
        steps = list(s.scalars(select(Step)))
        links = list(s.scalars(select(ParentLink)))
        effects = Counter(s.scalars(select(Effect.key)))
        outbox = int(s.scalar(select(func.count(OutboxEntry.id))) or 0)
    found.actions = len(actions)
    roots = {a.request_id for a in actions.values() if a.root}
    found.lost += [f"root of request {r} never created" for r in requests if r not in roots]
    found.stuck += [f"action {a.id} {a.name} {a.status}" for a in actions.values() if not _final(a)]
    found.stuck += [f"{n} outbox message(s) unsent" for n in [outbox] if n]
    found.stuck += [f"lane {lane.key!r} left in Redis" for lane in stepped.lanes.all()]
    _audit_steps(found, steps, links, effects)
    _audit_superseded(found, actions, links)
    return found


def _final(action: Action) -> bool:
    return action.status in FINAL_STATUSES


def _audit_steps(
    found: Findings, steps: list[Step], links: list[ParentLink], effects: Counter[str]
) -> None:
    by_step: dict[int, list[ParentLink]] = defaultdict(list)
    for link in links:
        by_step[link.step_id].append(link)
    keys = set()
    for step in steps:
        key = f"{step.action_id}:{step.definition_index}"
        keys.add(key)
        if effects[key] == 0:
            found.lost.append(f"step {step.id} ({key}): its body's effect is missing")
        elif effects[key] > 1:
            found.duplicated.append(f"step {step.id} ({key}): effect applied {effects[key]} times")
        if step.status in ("pending", "performing"):
            found.stuck.append(f"step {step.id} of action {step.action_id} {step.status}")
        _audit_join(found, step, by_step[step.id])
    found.duplicated += [f"effect {k} of no step" for k in effects if k not in keys]


def _audit_join(found: Findings, step: Step, links: list[ParentLink]) -> None:
    """The step's counters agree with its members: one count per member outcome."""
    waiting = [link for link in links if link.state == "waiting"]
    unsuccessful = [
        link for link in links if link.state == "done" and link.outcome not in ("succeeded", None)
    ]
    if waiting:
        found.stuck.append(f"step {step.id}: {len(waiting)} member(s) still waited on")
    if step.pending_actions_count != len(waiting):
        kind = found.duplicated if step.pending_actions_count < len(waiting) else found.lost
        kind.append(
            f"step {step.id}: join count {step.pending_actions_count} left, "
            f"{len(waiting)} member(s) not final"
        )
    if step.unsuccessful_actions_count != len(unsuccessful):
        found.lost.append(
            f"step {step.id}: {step.unsuccessful_actions_count} unsuccessful counted, "
            f"{len(unsuccessful)} member(s) unsuccessful"
        )


def _audit_superseded(found: Findings, actions: dict[int, Action], links: list[ParentLink]) -> None:
    """Every step that waited on a superseded action waits on (or counted) its superseder."""
    on_step: dict[int, set[int]] = defaultdict(set)
    for link in links:
        if link.action_id is not None:
            on_step[link.step_id].add(link.action_id)
    for link in links:
        old = actions.get(link.action_id or 0)
        if old is None or old.status != "superseded" or link.state != "transferred":
            continue
        chain, newer = set(), old.superseded_by_id
        while newer is not None and newer not in chain:
            chain.add(newer)
            newer = actions[newer].superseded_by_id if newer in actions else None
        if not chain & on_step[link.step_id]:
            found.lost.append(
                f"step {link.step_id} waited on superseded {old.id}, not on its superseder"
            )
