"""``celery stepped``: errors a person can fix answer in one line, exit 1, no traceback.

Each test breaks one real thing (the tables, Redis, a revision, an id) and reads what
the command says; one runs ``python -m celery`` to check the ``-A`` name and stderr.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.bin.base import CLIContext
from click.testing import CliRunner, Result
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from celery_stepped import Stepped
from celery_stepped.cli import stepped as stepped_group
from celery_stepped.models.migrations import current_revision, revisions
from tests.conftest import REDIS_DB

ROOT = Path(__file__).resolve().parents[2]


def invoke(stepped: Stepped, *args: str) -> Result:
    """Run ``celery stepped ARGS`` with the app of ``stepped``, exceptions caught."""
    obj = CLIContext(app=stepped.app, no_color=True, workdir=None)
    return CliRunner().invoke(stepped_group, list(args), obj=obj)


def one_error_line(result: Result) -> str:
    """The single ``Error: ...`` line of a failed command, without the prefix."""
    assert result.exit_code == 1, result.output
    assert not isinstance(result.exception, AssertionError | TypeError)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0].removeprefix("Error: ")


def drop_everything(stepped: Stepped) -> None:
    """No Stepped table and no recorded revision: a database never migrated."""
    stepped.drop_all()
    with stepped.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS stepped_alembic_version"))


def free_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def unreachable(database_url: str) -> Iterator[Stepped]:
    """A Stepped instance whose Redis (with a password) does not answer."""
    app = Celery("unreachable", set_as_current=False)
    url = f"redis://:s3cret@127.0.0.1:{free_port()}/4"
    instance = Stepped(app, database_url=database_url, redis_url=url)
    instance.create_all()
    yield instance
    instance.engine.dispose()


def test_unmigrated_database_says_to_migrate(stepped: Stepped) -> None:
    drop_everything(stepped)
    for command in (["actions"], ["tree", "1"], ["lanes"]):
        message = one_error_line(invoke(stepped, *command))
        dialect = stepped.engine.dialect.name  # sqlite:/// or postgresql+psycopg://
        assert message.startswith(f"the Stepped tables are missing in {dialect}")
        assert message.endswith("run `celery -A tests stepped migrate`")


def test_database_behind_the_code_says_to_migrate(stepped: Stepped) -> None:
    drop_everything(stepped)
    stepped.migrate(revisions()[0])
    message = one_error_line(invoke(stepped, "tree", "1"))
    assert f"are at revision {revisions()[0]}, not {revisions()[-1]}: run `celery" in message


def test_unreachable_redis_names_the_url_without_password(unreachable: Stepped) -> None:
    port = unreachable.redis.connection_pool.connection_kwargs["port"]
    for command in (["lanes"], ["repair"]):
        message = one_error_line(invoke(unreachable, *command))
        assert message.startswith(f"cannot reach Redis at redis://:***@127.0.0.1:{port}/4: ")
        assert "s3cret" not in message


def test_unreachable_database_names_the_url(tmp_path: Path, redis_base: str) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}"
    app = Celery("nodb", set_as_current=False)
    instance = Stepped(app, database_url=url, redis_url=f"{redis_base}/{REDIS_DB}")
    message = one_error_line(invoke(instance, "actions"))
    assert message.startswith(f"cannot reach the database {url}: ")


def test_migrate_to_an_unknown_revision_lists_the_shipped_ones(stepped: Stepped) -> None:
    message = one_error_line(invoke(stepped, "migrate", "--revision", "0999"))
    shipped = ", ".join(revisions())
    assert message == f"unknown revision '0999': the shipped ones are {shipped} (or head)"


def test_tree_of_an_unknown_id_says_so(stepped: Stepped) -> None:
    assert one_error_line(invoke(stepped, "tree", "4242")) == "no action #4242"


def test_create_all_then_migrate_is_at_head(stepped: Stepped) -> None:
    drop_everything(stepped)
    stepped.create_all()
    assert current_revision(stepped.engine) == revisions()[-1]
    stepped.create_all()  # again: still one version row
    result = invoke(stepped, "migrate")
    assert result.exit_code == 0, result.output
    with stepped.engine.connect() as conn:
        versions = conn.execute(text("SELECT version_num FROM stepped_alembic_version")).all()
    assert versions == [(revisions()[-1],)]
    assert "stepped_outbox" in sa_inspect(stepped.engine).get_table_names()


CLI_APP = """
import os
from celery import Celery
from celery_stepped import Stepped

app = Celery("named_otherwise", set_as_current=False)
stepped = Stepped(app, database_url=os.environ["DB_URL"], redis_url=os.environ["REDIS_URL"])
"""


def test_celery_command_line_names_the_app_and_prints_no_traceback(
    stepped: Stepped, database_url: str, redis_base: str, tmp_path: Path
) -> None:
    drop_everything(stepped)
    (tmp_path / "errors_app.py").write_text(textwrap.dedent(CLI_APP))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "DB_URL": database_url,
        "REDIS_URL": f"{redis_base}/{REDIS_DB}",
    }
    command = [sys.executable, "-m", "celery", "--workdir", str(tmp_path), "-A", "errors_app"]
    done = subprocess.run(
        [*command, "stepped", "actions"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("run `celery -A errors_app stepped migrate`")
    assert len(done.stderr.strip().splitlines()) == 1
