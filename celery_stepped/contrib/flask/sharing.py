"""Which actions a tree shares with other parents: checksum sharing and superseding.

An action in a tree may also be awaited by steps of other actions: a performing action
with the same checksum that a second caller's step attached to, or a superseder that
inherited the parents of the actions it superseded. A tree from
:func:`celery_stepped.views.action_tree` shows each action under one parent only; this
module finds the others, so the page can link to them.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from sqlalchemy import select

from ...models import Action, ParentLink, Step

if TYPE_CHECKING:
    from ...extension import Stepped

__all__ = ["parents_of"]


def parents_of(stepped: Stepped, action_ids: Collection[int]) -> dict[int, frozenset[int]]:
    """For each of these actions, the ids of every action whose steps wait or waited on it.

    A superseder's parents include those of the actions superseded into it (their links
    stay on them), at any length of the chain. Actions nobody awaited (roots) are left out.
    """
    if not action_ids:
        return {}
    start = select(Action.id.label("origin"), Action.id.label("id"))
    chain = start.where(Action.id.in_(sorted(action_ids))).cte("chain", recursive=True)
    chain = chain.union(
        select(chain.c.origin, Action.id).join(chain, Action.superseded_by_id == chain.c.id)
    )
    query = (
        select(chain.c.origin, Step.action_id)
        .join(ParentLink, ParentLink.action_id == chain.c.id)
        .join(Step, Step.id == ParentLink.step_id)
        .distinct()
    )
    found: dict[int, set[int]] = {}
    with stepped.session_factory() as session:
        for child, parent in session.execute(query).all():
            found.setdefault(child, set()).add(parent)
    return {child: frozenset(parents) for child, parents in found.items()}
