"""OpsCD's benchmarks: ``python -m bench`` (``--smoke`` for a few-second run of every scenario).

Starts what it measures (gunicorn, celery worker nodes, a git server, a
database and a Redis database of its own), runs each scenario beside a
baseline measured in the same run, and writes ``bench/results.json`` and
``docs/benchmarks.md``. See :mod:`bench.runner` for the scenarios.
"""
