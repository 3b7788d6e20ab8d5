"""What keeps a test run apart from everything else on a shared Redis and PostgreSQL.

A run never touches data it did not create. Every name it creates starts with its run
id, drawn at random when the test process starts:

- Redis (one database: the number in ``STEPPED_REDIS_URL``, else 0): the lanes live in
  the Stepped namespace :data:`RUN` (keys ``stepped:<RUN>:{<lane key>}:...``); the broker
  keys carry kombu's ``global_keyprefix`` ``<RUN>:broker:``; an integration module uses
  the namespace ``<RUN>-<module>`` and the prefixes ``<RUN>-<module>:broker:`` and
  ``<RUN>-<module>:probe:``. Cleaning up deletes the keys found by SCAN with these
  prefixes (glob characters escaped); nothing is flushed.
- PostgreSQL: the run creates the schema :data:`SCHEMA`, points every engine at it with
  ``options=-csearch_path=<schema>`` in the URL (worker subprocesses get the same URL),
  and drops only that schema at the end.
"""

from __future__ import annotations

import re
import secrets

import redis
from sqlalchemy import URL, make_url

from celery_stepped import keys

#: This run's id: the start of every Redis key and namespace it creates.
RUN = f"stepped-test-{secrets.token_hex(4)}"
#: This run's PostgreSQL schema.
SCHEMA = RUN.replace("-", "_")
#: kombu's ``global_keyprefix`` of the unit tests' broker keys.
BROKER_PREFIX = f"{RUN}:broker:"
#: Keys deleted per DEL command.
DELETE_BATCH = 500


def redis_base_and_db(url: str) -> tuple[str, int]:
    """``redis://host:port`` and the database number (0 when the URL names none)."""
    found = re.fullmatch(r"(.*?)(?:/(\d+))?/?", url)
    if found is None:
        raise ValueError(f"not a Redis URL: {url!r}")
    return found.group(1), int(found.group(2) or 0)


def prefix_pattern(prefix: str) -> str:
    """SCAN pattern of every key starting with ``prefix``, and no other."""
    return keys.escape_glob(prefix) + "*"


def delete_matching(client: redis.Redis, pattern: str) -> int:
    """Delete every key matching ``pattern`` (found by SCAN); how many there were."""
    deleted = 0
    batch: list[bytes | str] = []
    for key in client.scan_iter(match=pattern, count=DELETE_BATCH):
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def delete_owned(client: redis.Redis, name: str) -> int:
    """Delete the keys of ``name``: the lanes of namespace ``name`` and keys ``name:*``."""
    lanes = delete_matching(client, keys.namespace_pattern(name))
    return lanes + delete_matching(client, prefix_pattern(f"{name}:"))


def delete_run(client: redis.Redis) -> int:
    """Delete every key this run created, integration modules' included."""
    lanes = delete_matching(client, prefix_pattern(f"{keys.PREFIX}:{RUN}"))
    return lanes + delete_matching(client, prefix_pattern(RUN))


def in_schema(url: str | URL, schema: str) -> str:
    """The PostgreSQL ``url`` with every connection's ``search_path`` set to ``schema``."""
    parsed = make_url(url)
    options = parsed.query.get("options")
    if isinstance(options, tuple):
        options = " ".join(options)
    path = f"-csearch_path={schema}"
    merged = f"{options} {path}" if options else path
    return parsed.update_query_dict({"options": merged}).render_as_string(hide_password=False)
