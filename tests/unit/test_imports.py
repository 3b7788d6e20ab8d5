"""Importing the package stays cheap: every ``celery`` command loads the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import celery_stepped

HEAVY = ["alembic", "celery_stepped.extension", "redis", "rich", "sqlalchemy"]


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_cli_entry_point_imports_no_heavy_module() -> None:
    loaded = modules_after("import celery_stepped.cli")
    assert "celery_stepped.cli" in loaded
    assert [m for m in HEAVY if m in loaded] == []


def test_public_names_resolve_on_first_use() -> None:
    loaded = modules_after("from celery_stepped import ActionStatus, SteppedError")
    assert "sqlalchemy" not in loaded
    assert "celery_stepped.extension" in modules_after("from celery_stepped import Stepped")
    namespace: dict[str, object] = {}
    exec("from celery_stepped import *", namespace)
    assert set(celery_stepped.__all__) <= set(namespace)
    assert celery_stepped.Step is celery_stepped.StepContext
    assert set(celery_stepped.__all__) <= set(dir(celery_stepped))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        celery_stepped.Nothing  # noqa: B018
