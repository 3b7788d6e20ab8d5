"""Keys, checksum and timeout from what a definition's options give: a key from its
parts, the default key (``tenancy``), the checksum digest, seconds from a timeout
option, and all of a start's keys at once (``keys_of``)."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any, Protocol

__all__ = [
    "Definition",
    "checksum_digest",
    "key_from_parts",
    "keys_of",
    "needs_actor",
    "tenancy",
    "timeout_seconds",
]


class Definition(Protocol):
    """What starting reads of a definition (``SteppedAction``; this module sits below it)."""

    outbound: bool

    def resolved(self, name: str) -> Any: ...

    def before_hooks(self) -> list[Any]: ...


def tenancy(actor_type: str, actor_id: str, name: str) -> str:
    """The default concurrency and checksum key: ``actor_type/actor_id/name``."""
    return f"{actor_type}/{actor_id}/{name}"


def checksum_digest(value: Any) -> str:
    """SHA-256 hex digest of the canonical JSON of ``value``."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def key_from_parts(value: Any) -> str | None:
    """A key from a string or a list/tuple of parts joined with ``/``; None if empty."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        value = "/".join(str(v) for v in value)
    text = str(value)
    return text or None


def timeout_seconds(spec: Any, actor: Any) -> float | None:
    """Seconds from a timeout option: number, timedelta or callable(actor)."""
    if spec is None:
        return None
    if callable(spec) and not isinstance(spec, timedelta):
        spec = spec(actor)
    if spec is None:
        return None
    if isinstance(spec, timedelta):
        return spec.total_seconds()
    if isinstance(spec, int | float) and not isinstance(spec, bool):
        return float(spec)
    raise TypeError(f"timeout must give seconds or a timedelta, got {spec!r}")


def needs_actor(definition: Definition) -> bool:
    """True when starting runs user code: ``before``, or a key, timeout or checksum block."""
    timeout = definition.resolved("timeout_spec")
    blocks = (
        definition.resolved("concurrency_key_spec"),
        definition.resolved("checksum_key_spec"),
        definition.resolved("checksum_fn"),
        None if isinstance(timeout, timedelta) else timeout,
    )
    return bool(definition.before_hooks()) or any(callable(block) for block in blocks)


def keys_of(definition: Definition, actor: Any, args: list[Any], tenancy: str) -> dict[str, Any]:
    """Concurrency key, checksum key, timeout and job: from the arguments as given
    (``tenancy``: the default key, ``actor_type/actor_id/name``). Runs the definition's
    key and timeout blocks, which may raise."""
    keys: dict[str, Any] = {}
    for column, spec_name in (
        ("concurrency_key", "concurrency_key_spec"),
        ("checksum_key", "checksum_key_spec"),
    ):
        spec = definition.resolved(spec_name)
        value = spec(actor, *args) if callable(spec) else spec
        keys[column] = key_from_parts(value) or tenancy
    keys["timeout_seconds"] = timeout_seconds(definition.resolved("timeout_spec"), actor)
    job = definition.resolved("job")
    keys["job"] = None if job is None else str(job.name)
    return keys
