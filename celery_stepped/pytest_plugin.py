"""The pytest plugin of celery_stepped (entry point ``celery_stepped``).

Fixture ``stepped_jobs``: a ``stepped.capture()`` over the test's ``stepped`` fixture,
which the project defines.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .testing import JobQueue


@pytest.fixture
def stepped_jobs(stepped: Any) -> Iterator[JobQueue]:
    """Every job Stepped sends during the test, held in a ``JobQueue``."""
    with stepped.capture() as jobs:
        yield jobs
