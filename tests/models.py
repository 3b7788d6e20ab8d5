"""SQLAlchemy models used as actors by the test suite (and the integration worker app)."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class TestBase(DeclarativeBase):
    """Declarative base of the test actors."""


class Car(TestBase):
    """A car that can be driven and honked."""

    __tablename__ = "cars"

    id: Mapped[int] = mapped_column(primary_key=True)
    mileage: Mapped[int] = mapped_column(default=0)
    honks: Mapped[int] = mapped_column(default=0)
    location: Mapped[str] = mapped_column(String(100), default="")
    log: Mapped[str] = mapped_column(String(4000), default="")
    kind: Mapped[str] = mapped_column(String(20), default="car")

    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "car"}

    def honk(self) -> None:
        self.honks += 1

    def note(self, text: str) -> None:
        self.log = f"{self.log}{text};"


class SportsCar(Car):
    """A subclass (single-table inheritance) for MRO lookups."""

    __mapper_args__ = {"polymorphic_identity": "sports"}
