"""Actor identity and loading: SQLAlchemy instances out of the box, others registered.

Arguments travel as JSON; an actor anywhere inside them travels as a reference
``{"__stepped_actor__": [type_name, identity]}`` and is loaded again in the worker.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import NoInspectionAvailable
from sqlalchemy.orm import Mapper, Session

from .errors import ActorNotFound, ConfigurationError
from .models import Base as SteppedBase

__all__ = ["REF", "ActorRegistry", "ActorType", "is_reference"]

REF = "__stepped_actor__"
#: How deep arguments may nest (lists and dicts); deeper ones are refused at call time.
MAX_DEPTH = 32


@dataclass(frozen=True)
class ActorType:
    """How to identify and load one actor class."""

    cls: type
    type_name: str
    identify: Callable[[Any], str]
    load: Callable[[str], Any] | None  # None: a mapped class loaded through the session


def is_reference(value: Any) -> bool:
    """True for an actor reference ``{"__stepped_actor__": [type_name, identity]}``."""
    if not isinstance(value, dict) or set(value) != {REF}:
        return False
    ref = value[REF]
    return isinstance(ref, list | tuple) and len(ref) == 2 and all(isinstance(p, str) for p in ref)


def _mapper_of(cls: type) -> Mapper[Any] | None:
    try:
        mapper: Any = sa_inspect(cls, raiseerr=False)
    except NoInspectionAvailable:
        return None
    return mapper if isinstance(mapper, Mapper) else None


def _all_mapped_classes() -> list[type]:
    """Every mapped class of the app: Stepped's own records are never actors."""
    from sqlalchemy.orm import mapperlib

    classes: list[type] = []
    for reg in list(mapperlib._all_registries()):
        classes.extend(m.class_ for m in reg.mappers if not issubclass(m.class_, SteppedBase))
    return classes


def _mapped_identity(obj: Any) -> str:
    state = sa_inspect(obj)
    identity = state.identity
    if identity is None:
        session = state.session
        if session is not None:
            session.flush([obj])
            identity = state.identity
    if identity is None:
        raise TypeError(f"{obj!r} has no primary key yet: add and flush it before using it")
    if len(identity) == 1:
        return str(identity[0])
    return json.dumps(list(identity))


class ActorRegistry:
    """Resolves actor types by name and turns actors into references and back."""

    def __init__(self, session_factory: Callable[[], Session]) -> None:
        self._session_factory = session_factory
        self._by_class: dict[type, ActorType] = {}
        self._by_name: dict[str, ActorType] = {}
        self._resolved: dict[str, ActorType] = {}
        #: Mapped classes used as actors without registering, checked once each.
        self._implicit: dict[type, ActorType] = {}

    def register(
        self,
        cls: type,
        *,
        identify: Callable[[Any], str],
        load: Callable[[str], Any],
        type_name: str | None = None,
    ) -> ActorType:
        """Register a non-SQLAlchemy actor class (or rename a mapped one)."""
        if not callable(identify) or not callable(load):
            raise TypeError("register_actor needs callables identify(obj) and load(identity)")
        actor_type = ActorType(cls, type_name or cls.__name__, identify, load)
        self._resolved.clear()
        self._by_class[cls] = actor_type
        self._by_name[actor_type.type_name] = actor_type
        return actor_type

    def type_of(self, obj_or_cls: Any) -> ActorType:
        """The :class:`ActorType` of an actor or actor class."""
        cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
        for klass in cls.__mro__:
            if klass in self._by_class:
                return self._by_class[klass]
        if cls in self._implicit:
            return self._implicit[cls]
        if _mapper_of(cls) is not None and not issubclass(cls, SteppedBase):
            mapped = ActorType(cls, cls.__name__, _mapped_identity, None)
            self._check_unique_name(mapped)  # a scan of every mapped class: once
            self._implicit[cls] = mapped
            return mapped
        raise TypeError(
            f"{cls.__name__} is not an actor: use a SQLAlchemy-mapped instance or "
            "stepped.register_actor()"
        )

    def is_actor(self, obj: Any) -> bool:
        """True for objects that travel as actor references."""
        if isinstance(obj, type) or obj is None:
            return False
        cls = type(obj)
        if any(k in self._by_class for k in cls.__mro__):
            return True
        return _mapper_of(cls) is not None and not issubclass(cls, SteppedBase)

    def _check_unique_name(self, actor_type: ActorType) -> None:
        if actor_type.type_name in self._by_name:
            return
        clashes = [c for c in _all_mapped_classes() if c.__name__ == actor_type.type_name]
        if len(clashes) > 1:
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in clashes)
            raise ConfigurationError(
                f"two actor classes are named {actor_type.type_name!r} ({names}): "
                "give one a type_name with stepped.register_actor(..., type_name=...)"
            )

    def resolve(self, type_name: str) -> ActorType:
        """The actor type registered or mapped under ``type_name`` (cached)."""
        if type_name in self._by_name:
            return self._by_name[type_name]
        found = self._resolved.get(type_name)
        if found is None:
            found = self._resolved[type_name] = self._resolve_mapped(type_name)
        return found

    def _resolve_mapped(self, type_name: str) -> ActorType:
        matches = [
            c
            for c in _all_mapped_classes()
            if c.__name__ == type_name and not any(k in self._by_class for k in c.__mro__ if k is c)
        ]
        if not matches:
            raise ActorNotFound(f"no mapped or registered actor type named {type_name!r}")
        if len(matches) > 1:
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in matches)
            raise ConfigurationError(
                f"two actor classes are named {type_name!r} ({names}): "
                "give one a type_name with stepped.register_actor(..., type_name=...)"
            )
        return ActorType(matches[0], type_name, _mapped_identity, None)

    def identify(self, actor: Any) -> tuple[str, str]:
        """``(type_name, identity)`` of an actor."""
        actor_type = self.type_of(actor)
        return actor_type.type_name, actor_type.identify(actor)

    def usable(self, actor: Any) -> bool:
        """Whether a caller's actor object can stand for a fresh load of its row: a
        registered actor, or a mapped instance with a row and no expired attributes
        outside a session (reading those would raise)."""
        if _mapper_of(type(actor)) is None:
            return True
        state = sa_inspect(actor)
        if state.identity is None or state.deleted or state.was_deleted:
            return False
        return state.session is not None or not state.expired_attributes

    def load_ref(self, type_name: str, identity: str, session: Session | None = None) -> Any:
        """Load an actor by type name and identity (through ``session`` if mapped)."""
        actor_type = self.resolve(type_name)
        if actor_type.load is not None:
            return actor_type.load(identity)
        mapper = _mapper_of(actor_type.cls)
        if mapper is None:  # pragma: no cover - resolve() only returns mapped classes
            raise ActorNotFound(type_name)
        pk = self._parse_pk(mapper, identity)
        if session is None:
            with self._session_factory() as own:
                obj = own.get(actor_type.cls, pk)
                if obj is not None:
                    own.expunge(obj)
        else:
            obj = session.get(actor_type.cls, pk)
        if obj is None:
            raise ActorNotFound(f"{type_name}/{identity} does not exist")
        return obj

    @staticmethod
    def _parse_pk(mapper: Mapper[Any], identity: str) -> Any:
        columns = mapper.primary_key
        raw = [identity] if len(columns) == 1 else json.loads(identity)
        values = []
        for column, value in zip(columns, raw, strict=True):
            try:
                python_type = column.type.python_type
            except NotImplementedError:
                python_type = str
            values.append(value if isinstance(value, python_type) else python_type(value))
        return values[0] if len(values) == 1 else tuple(values)

    # -- arguments ---------------------------------------------------------------

    def dump(self, value: Any, path: str = "arguments", depth: int = 0) -> Any:
        """JSON-ready copy of ``value`` with actors as references; TypeError otherwise
        (also for values nested deeper than ``MAX_DEPTH`` levels)."""
        if depth > MAX_DEPTH:
            raise TypeError(f"{path}: arguments nest deeper than {MAX_DEPTH} levels")
        if value is None or isinstance(value, bool | int | str):
            return value
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise TypeError(f"{path}: {value!r} is not JSON-serialisable")
            return value
        if isinstance(value, list | tuple):
            return [self.dump(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        if is_reference(value):  # dumped before (a stepped signature's arguments)
            return {REF: [str(part) for part in value[REF]]}
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError(f"{path}: dict key {k!r} is not a string")
                if k == REF:
                    raise TypeError(f"{path}: the key {REF!r} is reserved")
                out[k] = self.dump(v, f"{path}[{k!r}]", depth + 1)
            return out
        if self.is_actor(value):
            return {REF: list(self.identify(value))}
        raise TypeError(f"{path}: {type(value).__name__} is not JSON-serialisable and not an actor")

    def load(self, value: Any, session: Session | None = None) -> Any:
        """Inverse of :meth:`dump`: actor references become loaded actors."""
        if isinstance(value, list):
            return [self.load(v, session) for v in value]
        if isinstance(value, dict):
            if set(value) == {REF}:
                type_name, identity = value[REF]
                return self.load_ref(type_name, identity, session)
            return {k: self.load(v, session) for k, v in value.items()}
        return value
