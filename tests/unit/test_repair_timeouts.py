"""Repair re-sends a timeout only where Redis (and the broker's scheduled messages with
it) was lost; a healthy action's timeout is left alone (issue 16, item 5)."""

from __future__ import annotations

from celery_stepped import Stepped
from tests.models import Car


def test_repair_leaves_healthy_timeouts_alone_and_resends_lost_ones(
    stepped: Stepped, car: Car
) -> None:
    app = stepped.app

    @app.stepped_action(outbound=True, timeout=3600)
    def approve(car: Car) -> None:
        pass

    with stepped.capture():
        action = approve.now(car)
        healthy = stepped.repair()
        assert [r.task for r in healthy.resends] == []
        assert healthy.lines == []
        stepped.lanes.clear()  # Redis lost its data
        lost = stepped.repair()
    assert [(r.task, r.target) for r in lost.resends] == [("stepped.timeout", action.id)]
    assert 3590 < (lost.resends[0].countdown or 0) <= 3600
