"""OpsCD, a self-hosted CI/CD service: three layers that depend one way.

- The **core**, the modules at this level: configuration (:mod:`cicd.config`),
  errors, models and the database, the ``ci.yaml`` spec, languages, project
  secrets, forge payload parsing (:mod:`cicd.forges`) and the broker contract
  (:mod:`cicd.broker`: the Celery app, queue names, stage task names, sending
  and revoking). It imports neither Flask nor the worker.
- The **web side**, :mod:`cicd.web` (the Flask app: webhook, API, metrics,
  pages) and the command line (:mod:`cicd.cli`, ``cicd up``, ``cicd trigger``).
- The **worker side**, the ``workers`` package (stages, executors, signals,
  heartbeats, the reaper), which depends on the core and never on the web side.

``tests/test_layers.py`` walks the imports and fails on a step the wrong way.
"""

__version__ = "0.1.0"
