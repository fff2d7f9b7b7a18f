"""The broker-facing end-to-end tests again, on RabbitMQ: an installation of its own (a
virtual host on the machine's RabbitMQ, a MariaDB database, a gunicorn and two worker nodes).

As in test_postgresql, the tests are the MariaDB-and-Redis modules' own functions,
imported: this module's ``opscd_env``, ``web`` and ``workers`` stand in for the session's.
They are the ones that lean on the broker: the webhook's send, the chain of stages through
each node's direct queue, language queues, cancel (revoke), retry, the capacity of a node.
"""

from __future__ import annotations

import uuid

import pytest
import requests
from conftest import (
    AMQP_SETTINGS,
    GitRepo,
    Process,
    gitlab_payload,
    installation_fixtures,
    opscd_environment,
    post_gitlab,
    rabbitmqctl,
    serve_web,
    start_nodes,
    task_log,
    wait_for_task,
    worker_args,
)
from support.services import PrivateRabbitMQ
from test_monitoring import (  # noqa: F401 (collected here, on RabbitMQ)
    test_cancel_stops_a_running_build,
    test_live_log_streams_lines_before_the_build_ends,
    test_metrics_count_builds_agents_and_queues,
    test_no_node_runs_more_than_three_builds_at_once,
    test_retry_runs_the_same_commit_as_a_new_task,
    test_worker_nodes_heartbeat_into_agent_states,
)
from test_pipeline import (  # noqa: F401 (collected here, on RabbitMQ)
    test_failing_script_fails_with_exit_code_and_log,
    test_push_builds_and_succeeds_with_log,
    test_redelivery_returns_the_first_task,
    test_stages_stay_on_the_node_that_cloned,
)

pytestmark = pytest.mark.usefixtures("workers")


@pytest.fixture(scope="module")
def opscd_env(make_database, amqp_url, tmp_path_factory) -> dict[str, str]:
    """An installation on the machine's RabbitMQ, in this session's virtual host."""
    _, url = make_database("opscd_amqp")
    return opscd_environment(url, amqp_url, tmp_path_factory, **AMQP_SETTINGS)


web, workers = installation_fixtures("amqp")


def test_build_queues_are_durable_quorum_queues_and_node_queues_dead_letter(amqp_vhost, workers):
    """The queues RabbitMQ holds builds in survive its restart (and, in a cluster, the loss
    of a node); a node's own queue hands what expires in it to the build queue."""
    listed = rabbitmqctl("list_queues", "-p", amqp_vhost, "name", "type", "durable", "arguments")
    rows = [line.split("\t") for line in listed.splitlines()[1:]]
    queues = {name: (kind, durable, arguments) for name, kind, durable, arguments in rows}
    for name in ("opscd.builds", "opscd.builds.java", "opscd.builds.python"):
        assert queues[name][:2] == ("quorum", "true"), (name, queues[name])
    own = next(name for name in queues if name.startswith("node1@") and name.endswith(".dq2"))
    assert queues[own][1] == "true" and "x-dead-letter-routing-key" in queues[own][2]
    assert "opscd.builds" in queues[own][2]


def test_a_worker_refuses_to_start_when_a_stage_could_outlive_the_consumer_timeout(
    opscd_env, tmp_path
):
    """RabbitMQ closes the channel of a message unacknowledged past its consumer_timeout (30
    min by default) and delivers it again: a build longer than that would run twice. A node
    whose longest stage (4 h 20 min by default) is longer says what to set, and stops."""
    env = {**opscd_env, "CICD_MAX_BUILD_TIMEOUT": "14400", "CICD_CLONE_TIMEOUT": "600"}
    env.pop("CICD_BROKER_CONSUMER_TIMEOUT")
    node = Process("too-long", worker_args("too-long"), env, tmp_path)
    assert node.popen.wait(60) != 0
    output = node.output()
    assert "consumer_timeout" in output and "CICD_BROKER_CONSUMER_TIMEOUT" in output, output
    assert "consumer_timeout = 16200000" in output  # the rabbitmq.conf line to add


def test_a_build_rabbitmq_refuses_is_answered_503_and_built_when_delivered_again(
    make_database, git_server, tmp_path, tmp_path_factory
):
    """Publisher confirms: a 202 means RabbitMQ has the build. A queue that refuses it (here
    a policy capping the build queue, with no node to empty it) nacks the send and the
    webhook answers 503, so GitLab delivers it again; without confirms it would be dropped
    after a 202. Every build that got a 202 is built once a node comes."""
    node = PrivateRabbitMQ(tmp_path / "rabbitmq").start()
    processes = []
    try:
        node.ctl("set_policy", "--apply-to", "queues", "full", r"^opscd\.builds$",
                 '{"max-length": 1, "overflow": "reject-publish"}')  # fmt: skip
        _, url = make_database("opscd_nack")
        env = opscd_environment(url, node.url, tmp_path_factory, **AMQP_SETTINGS)
        web_process, web = serve_web(env, tmp_path)
        processes.append(web_process)
        repo = GitRepo.create(git_server.root, f"nack/app-{uuid.uuid4().hex[:6]}")
        repo.clone_url = git_server.repo_url(repo.project_path)
        accepted, refused = [], None
        for n in range(6):  # a quorum queue applies its limit within a message or two
            sha = repo.commit({"ci.yaml": f"build:\n  script: echo confirmed {n}\n"})
            payload = gitlab_payload("push-event.json", repo, "refs/heads/main", sha)
            delivery = str(uuid.uuid4())
            answer = post_gitlab(web, payload, delivery=delivery)
            if answer.status_code == 503:
                refused = (payload, delivery, answer.json()["task_id"])
                break
            assert answer.status_code == 202, answer.text
            accepted.append(answer.json()["task_id"])
        assert refused is not None and accepted, accepted
        payload, delivery, task_id = refused
        task = requests.get(f"{web}/api/tasks/{task_id}", timeout=5).json()
        assert task["state"] == "failed" and "broker" in task["error"], task
        node.ctl("clear_policy", "full")
        again = post_gitlab(web, payload, delivery=delivery)  # GitLab's redelivery
        assert again.status_code == 202 and again.json()["task_id"] == task_id
        processes.extend(start_nodes(env, tmp_path, names=("confirmed",)))
        for built in [*accepted, task_id]:
            done = wait_for_task(web, built, timeout=60)
            assert done["state"] == "success", task_log(web, built)
    finally:
        for process in processes:
            process.stop()
        node.stop()
