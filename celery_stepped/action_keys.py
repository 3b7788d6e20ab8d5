"""Keys, checksum and timeout from what a definition's options give: a key from its
parts, the checksum digest, seconds from a timeout option."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

__all__ = ["checksum_digest", "key_from_parts", "timeout_seconds"]


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
