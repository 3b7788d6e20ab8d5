"""Children created with their parent's step: the pending rows a step writes for the
child actions whose start runs no user code of theirs (no ``before``, no checksum).

A child action whose definition has no ``before`` and no checksum needs nothing from
its own start but its keys and timeout, which come from the arguments as given. They
are computed when the step body that asked for it (``step.do/on``) has returned, with
the actor and arguments as the body left them, so its parent step writes its row
(``pending``, its link claimed) in the body's transaction, in one ``INSERT ...
RETURNING`` for all of the step's children (multi-row where the database returns ids
in order, PostgreSQL; a row at a time on SQLite), and its start message names it
(``StartCall.action``): the child's start reads that row and enters its lane, instead
of writing it and claiming its link in a transaction of its own.

Every other child is created by its own start (:mod:`~celery_stepped.starting`), where
its ``before`` runs: an action that ``before`` stops writes no row (API.md, "Fine
print"), and a checksum is computed after ``before``. A key or timeout block that
raises when the step body has returned leaves its child to its own start, which runs
the block again and reports its failure as before.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from .action_keys import Definition, keys_of, tenancy
from .models import ACTIONS as _ACTIONS
from .statuses import ActionStatus

if TYPE_CHECKING:
    from .models import ParentLink

__all__ = ["child_row", "write_children"]


#: The pending rows of a step's plain children, their ids back in the order given.
_INSERT_CHILDREN = insert(_ACTIONS).returning(_ACTIONS.c.id, sort_by_parameter_order=True)


def child_row(
    definition: Definition, actor: Any, args: list[Any], call: dict[str, Any]
) -> dict[str, Any] | None:
    """The pending row of a child that its parent step can write (``call``: its start,
    ``actor`` and ``args``: as the step body gave them), without its ancestry and times;
    None when its own start must create it: it has ``before`` or a checksum, or a key
    or timeout block raised (its start runs the block again and reports it)."""
    if definition.before_hooks() or definition.resolved("checksum_fn") is not None:
        return None
    actor_type, actor_id = call["actor"]
    try:
        keys = keys_of(definition, actor, args, tenancy(actor_type, actor_id, call["name"]))
    except Exception:
        return None
    return {
        "name": call["name"],
        "actor_type": actor_type,
        "actor_id": actor_id,
        "arguments": call["args"],
        "status": ActionStatus.PENDING.value,
        "root": False,
        "outbound": definition.outbound,
        **keys,
    }


def write_children(
    s: Session, links: list[ParentLink], rows: list[dict[str, Any] | None], now: datetime
) -> None:
    """Write in ``s`` the pending rows of the children among ``links`` (not yet written)
    that have one in ``rows`` (by position), and give each of their links its action."""
    planned = [
        (
            link,
            {
                **row,
                "ancestry": (link.call or {})["ancestry"],
                "created_at": now,
                "updated_at": now,
            },
        )
        for link, row in zip(links, rows, strict=True)
        if row is not None
    ]
    if not planned:
        return
    ids = s.execute(_INSERT_CHILDREN, [row for _, row in planned]).scalars().all()
    for (link, _), action_id in zip(planned, ids, strict=True):
        link.action_id = action_id
