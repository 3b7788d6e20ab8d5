"""The README's "Testing your workflows" example, run by pytest in a subprocess as a user
would: with pytest-celery's plugin ``celery``, and without it (the celery_stepped plugin
then registers ``celery.contrib.pytest`` itself). It uses its own embedded Redis server
(``stepped_redis_url``) and SQLite files in its own directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, WAIT

SECTION = "### Testing your workflows"


def readme_example() -> dict[str, str]:
    """The section's Python blocks by the file name each starts with (``# conftest.py``)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    return {block.splitlines()[0].removeprefix("# ").strip(): block for block in blocks}


@pytest.mark.parametrize("options", [[], ["-p", "no:celery"]], ids=["pytest-celery", "without"])
def test_the_readme_example_passes(tmp_path: Path, options: list[str]) -> None:
    files = readme_example()
    assert sorted(files) == ["conftest.py", "test_trips.py"]
    for name, code in files.items():
        (tmp_path / name).write_text(code, encoding="utf-8")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options]
    run = subprocess.run(
        [*command, "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT * 2,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 passed" in run.stdout
