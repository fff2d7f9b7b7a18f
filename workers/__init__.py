"""OpsCD's data plane: the Celery app, the build stages, the executors and the signal handlers."""
