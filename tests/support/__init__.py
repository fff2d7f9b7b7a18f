"""Helpers the test suite and the bench share: processes, services, git, webhooks.

Plain modules with no pytest in them, so the bench (``python -m bench``)
imports them as ``tests.support`` and the tests (through ``conftest.py``) as
``support``; each helper exists once. The one exception is ``forge_tests``, the
tests GitHub and Gitea share, which only the test files import.
"""
