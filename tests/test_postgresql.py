"""The database-facing end-to-end tests again, on PostgreSQL: an installation of its own (a
PostgreSQL database, its own broker keys, a gunicorn and two Procfile-style worker nodes).

The tests below are the same functions as in the MariaDB modules, imported: this module's
``opscd_env``, ``web`` and ``workers`` fixtures stand in for the session's, so each runs
once per database with one body. They are the ones whose SQL differs between the two:
the webhook's rows and its duplicate deliveries, the clone's claim of a slot (row locks),
the API's filters, the live log's reads (SSE, from an id on), cancel and retry, the
metrics' date arithmetic and the heartbeats. Migrations, the lifecycle's races, agent
accounts and a database restart are parametrised in their own modules
(test_schema, test_lifecycle, test_capacity, test_agents, test_reliability).
"""

from __future__ import annotations

import pytest
from conftest import SESSION, installation_fixtures, opscd_environment
from test_monitoring import (  # noqa: F401 (collected here, on PostgreSQL)
    test_cancel_stops_a_running_build,
    test_live_log_streams_lines_before_the_build_ends,
    test_log_stream_resumes_after_last_event_id,
    test_metrics_count_builds_agents_and_queues,
    test_no_node_runs_more_than_three_builds_at_once,
    test_retry_runs_the_same_commit_as_a_new_task,
    test_worker_nodes_heartbeat_into_agent_states,
)
from test_pipeline import (  # noqa: F401 (collected here, on PostgreSQL)
    test_api_filters_and_errors,
    test_exact_commit_is_built_not_the_branch_head,
    test_failing_script_fails_with_exit_code_and_log,
    test_push_builds_and_succeeds_with_log,
    test_redelivery_returns_the_first_task,
    test_wrong_or_missing_token_is_refused_and_nothing_recorded,
)

pytestmark = pytest.mark.usefixtures("workers")


@pytest.fixture(scope="module")
def opscd_env(make_database, broker_url, tmp_path_factory) -> dict[str, str]:
    """The PostgreSQL installation's settings; its schema made by ``cicd init-db``."""
    _, url = make_database("opscd_pg", "postgresql")
    return opscd_environment(url, broker_url, tmp_path_factory, f"opscd-test-{SESSION}-pg:")


web, workers = installation_fixtures("pg")


def test_this_installation_runs_on_postgresql(web, opscd_env):
    """The imported tests above really talk to PostgreSQL, not to the session's MariaDB."""
    import requests

    assert opscd_env["CICD_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert requests.get(f"{web}/healthz", timeout=5).ok
