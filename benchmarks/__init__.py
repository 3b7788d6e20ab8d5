"""Benchmarks of celery_stepped against plain Celery: ``python -m benchmarks.run``."""
