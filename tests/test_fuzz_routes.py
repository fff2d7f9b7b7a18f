"""Every route of the web process, fed generated headers and bodies: never a 500.

Against a real gunicorn on a database of its own (the generated requests cancel,
retry and delete whatever their ids hit, so not the session's builds).
"""

from __future__ import annotations

import json
import re

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cicd.config import settings_from
from cicd.web import create_app

ROUTES = sorted(
    (rule.rule, method)
    for rule in create_app(settings_from({"CICD_DATABASE_URL": "sqlite://",
                                          "CICD_BROKER_URL": "redis://127.0.0.1:9"})).url_map.iter_rules()
    for method in rule.methods - {"HEAD", "OPTIONS"}
    if rule.endpoint != "static"
)  # fmt: skip
header_values = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=40)
HEADERS = ["Last-Event-ID", "Content-Type", "X-Gitlab-Token", "X-Gitlab-Event",
           "X-Gitlab-Event-UUID", "Idempotency-Key", "Authorization", "X-Requested-With",
           "Accept"]  # fmt: skip
segment = st.one_of(
    st.integers(min_value=-5, max_value=10**20).map(str),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="/?#%"),
            min_size=1, max_size=20),
)  # fmt: skip
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10),
                                                                       children, max_size=4),
    max_leaves=8,
)  # fmt: skip
bodies = st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode()))


@pytest.fixture(scope="module")
def fuzz_web(start_web, isolated_env) -> str:
    env = isolated_env("fuzz")
    return start_web(**{k: v for k, v in env.items() if k.startswith("CICD_")})


def fill(rule: str, draw) -> str:
    return re.sub(r"<(?:[a-z]+:)?[a-z_]+>", lambda _: draw(segment), rule)


@pytest.mark.parametrize(("rule", "method"), ROUTES, ids=[f"{m} {r}" for r, m in ROUTES])
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())  # fmt: skip
def test_no_route_answers_500(fuzz_web, rule, method, data):
    path = fill(rule, data.draw)
    query = data.draw(st.dictionaries(st.sampled_from(["follow", "attempt", "limit", "before",
                                                       "state", "project", "branch", "tag",
                                                       "from"]), segment, max_size=3))  # fmt: skip
    headers = data.draw(st.dictionaries(st.sampled_from(HEADERS), header_values, max_size=4))
    if query.get("follow"):
        query["follow"] = "0"  # a stream of a build that never ends would hold the request
    body = data.draw(bodies)
    response = requests.request(method, fuzz_web + path, params=query, headers=headers,
                                data=body, timeout=10)  # fmt: skip
    assert response.status_code < 500, (method, path, query, headers, body, response.text)


@pytest.mark.parametrize("value", ["abc", "-1", "1" * 40, "1e5", "³"])
def test_a_bad_last_event_id_is_400_not_500(web, value):
    tasks = requests.get(f"{web}/api/tasks", params={"limit": 1}, timeout=10).json()["tasks"]
    task_id = tasks[0]["task_id"] if tasks else 1
    response = requests.get(f"{web}/api/tasks/{task_id}/log", params={"follow": "1"},
                            headers={"Last-Event-ID": value}, timeout=10)  # fmt: skip
    assert response.status_code in (400, 404)
    if tasks:
        assert response.status_code == 400 and "Last-Event-ID" in response.json()["error"]
