"""Integrations of celery_stepped with web frameworks (each needs its own extra).

- :mod:`celery_stepped.contrib.flask`: a Flask blueprint that shows live action trees
  (``pip install 'celery-stepped[flask]'``).
"""
