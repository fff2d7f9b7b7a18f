"""Tests for ``steps:``, ``services:`` and ``when:`` in :mod:`cicd.ciyaml`.

Real ci.yaml text in, a Pipeline, a skip reason or an exact error message out.
"""

from __future__ import annotations

import json
import textwrap

import pydantic
import pytest

from cicd.ciyaml import (
    BuildSpec,
    Pipeline,
    ServiceSpec,
    StepContext,
    StepSpec,
    parse_pipeline,
)
from cicd.errors import PipelineError

THREE_STEPS = """\
steps:
  - name: lint
    image: python:3.12
    commands: ruff check .
  - name: test
    image: python:3.12
    commands:
      - pip install -e .
      - pytest -q
    depends_on: []
  - name: deploy
    image: alpine:3.20
    commands: ./deploy.sh
    depends_on: [lint, test]
"""


def yaml_doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def error_of(text: str) -> str:
    """The message parse_pipeline raises for ``text``; fails the test if it parses."""
    with pytest.raises(PipelineError) as info:
        parse_pipeline(yaml_doc(text))
    return str(info.value)


def parse(text: str) -> Pipeline:
    return parse_pipeline(yaml_doc(text))


def step_of(when: str) -> StepSpec:
    """The one step of a file whose ``when:`` is ``when`` (YAML, indented under the step)."""
    text = "steps:\n  - name: s\n    commands: make\n    when:\n"
    text += "".join(f"      {line}\n" for line in yaml_doc(when).splitlines())
    return parse_pipeline(text).steps_to_run[0]


def context(
    event: str = "push",
    branch: str | None = "main",
    tag: str | None = None,
    changed: tuple[str, ...] | None = None,
    failed: bool = False,
) -> StepContext:
    return StepContext(event=event, branch=branch, tag=tag, changed_files=changed, failed=failed)


# --- valid files ------------------------------------------------------------------------------


def test_three_steps_with_a_depends_on_graph() -> None:
    pipeline = parse_pipeline(THREE_STEPS)
    assert pipeline.build is None
    assert [step.name for step in pipeline.steps_to_run] == ["lint", "test", "deploy"]
    assert pipeline.steps_to_run[1].commands_to_run == ["pip install -e .", "pytest -q"]
    assert pipeline.steps_to_run[0].commands_to_run == ["ruff check ."]
    assert pipeline.dependencies == {"lint": (), "test": (), "deploy": ("lint", "test")}


def test_steps_without_depends_on_run_in_file_order() -> None:
    pipeline = parse(
        """
        steps:
          - {name: one, commands: a}
          - {name: two, commands: b}
          - {name: three, commands: c}
        """
    )
    assert pipeline.dependencies == {"one": (), "two": ("one",), "three": ("two",)}


def test_steps_as_a_mapping_keep_their_order_and_take_the_key_as_name() -> None:
    pipeline = parse(
        """
        steps:
          zeta:
            commands: a
          alpha:
            commands: b
            depends_on: zeta
        """
    )
    assert [step.name for step in pipeline.steps_to_run] == ["zeta", "alpha"]
    assert pipeline.dependencies == {"zeta": (), "alpha": ("zeta",)}


def test_step_defaults() -> None:
    step = parse("steps:\n  - {name: a, commands: make}\n").steps_to_run[0]
    assert step == StepSpec(name="a", commands=["make"])
    assert (step.image, step.language, step.timeout) == (None, None, None)
    assert (step.workdir, step.directory, step.failure) == ("/workspace", ".", "fail")
    assert (step.environment, step.secrets, step.when, step.depends_on) == ({}, [], None, None)


def test_all_step_fields() -> None:
    step = parse(
        """
        steps:
          - name: docs.build_1
            image: python:3.12
            language: python
            commands: make html
            environment: {MODE: fast}
            secrets: [DOCS_TOKEN]
            timeout: 10m
            workdir: /src
            directory: docs
            failure: ignore
        """
    ).steps_to_run[0]
    assert step.model_dump() == {
        "name": "docs.build_1",
        "image": "python:3.12",
        "language": "python",
        "commands": ["make html"],
        "environment": {"MODE": "fast"},
        "secrets": ["DOCS_TOKEN"],
        "timeout": 600,
        "workdir": "/src",
        "directory": "docs",
        "when": None,
        "depends_on": None,
        "failure": "ignore",
    }


def test_language_alone_brings_its_default_script() -> None:
    step = parse("steps:\n  - {name: unit, language: go}\n").steps_to_run[0]
    assert step.commands is None
    assert step.commands_to_run == ["go build ./...", "go test ./..."]


def test_build_shorthand_is_one_step_named_build() -> None:
    pipeline = parse(
        """
        build:
          language: java
          image: maven:3.3-jdk-8
          workdir: /usr/src/mymaven
          script: mvn package
          env: {JAVA: 17}
          timeout: 1h
          secrets: [MAVEN_TOKEN]
        """
    )
    assert pipeline.steps is None
    assert pipeline.steps_to_run == (
        StepSpec(
            name="build",
            image="maven:3.3-jdk-8",
            language="java",
            workdir="/usr/src/mymaven",
            commands=["mvn package"],
            environment={"JAVA": "17"},
            timeout=3600,
            secrets=["MAVEN_TOKEN"],
        ),
    )
    assert pipeline.dependencies == {"build": ()}


def test_build_shorthand_with_the_language_default_script() -> None:
    (step,) = parse("build:\n  language: java\n").steps_to_run
    assert step.commands is None
    assert step.commands_to_run == ["mvn -B package"]
    assert step.image is None  # the language's default image is chosen by the worker


def test_build_from_python_still_works() -> None:
    pipeline = Pipeline(build=BuildSpec(script="make"))
    assert [step.commands_to_run for step in pipeline.steps_to_run] == [["make"]]


def test_environment_values_stay_verbatim() -> None:
    pipeline = parse(
        """
        steps:
          - name: list
            commands: make
            environment: {PYTHON: 3.10, MODE: 010, FLAG: true}
          - name: merged
            commands: make
            environment:
              <<: {GO: 1.20}
              N: 7
        services:
          db:
            image: postgres:16
            environment:
              PGVERSION: 16.0
        """
    )
    first, second = pipeline.steps_to_run
    assert first.environment == {"PYTHON": "3.10", "MODE": "010", "FLAG": "true"}
    assert second.environment == {"GO": "1.20", "N": "7"}
    assert pipeline.services[0].environment == {"PGVERSION": "16.0"}


def test_services_as_a_list() -> None:
    pipeline = parse(
        """
        services:
          - name: db
            image: postgres:16
            environment: {POSTGRES_PASSWORD: test}
          - name: cache
            image: redis:7
            commands: redis-server --save ""
        steps:
          - {name: test, commands: pytest}
        """
    )
    assert pipeline.services == (
        ServiceSpec(name="db", image="postgres:16", environment={"POSTGRES_PASSWORD": "test"}),
        ServiceSpec(name="cache", image="redis:7", commands=['redis-server --save ""']),
    )


def test_services_as_a_mapping_keep_their_order() -> None:
    pipeline = parse(
        """
        steps:
          test: {commands: pytest}
        services:
          redis: {image: redis:7}
          db:
            image: postgres:16
        """
    )
    assert [(s.name, s.image) for s in pipeline.services] == [
        ("redis", "redis:7"),
        ("db", "postgres:16"),
    ]
    assert pipeline.services[1].commands is None


def test_services_beside_a_build() -> None:
    pipeline = parse("build:\n  script: make\nservices:\n  db: {image: postgres}\n")
    assert [s.name for s in pipeline.services] == ["db"]


def test_a_name_inside_a_mapping_entry_may_repeat_its_key() -> None:
    pipeline = parse("steps:\n  test:\n    name: test\n    commands: make\n")
    assert pipeline.steps_to_run[0].name == "test"


def test_when_as_a_list_and_as_a_single_mapping() -> None:
    single = step_of("branch: main\nevent: [push, merge_request]")
    listed = step_of("- branch: main\n  event: [push, merge_request]")
    assert single == listed
    assert single.when is not None and len(single.when) == 1
    condition = single.when[0]
    assert condition.branch == ["main"]
    assert condition.event == ["push", "merge_request"]
    assert condition.status == ["success"]
    two = step_of("- branch: main\n- tag: v*")
    assert two.when is not None and [c.tag for c in two.when] == [None, ["v*"]]


def test_path_forms() -> None:
    one = step_of("path: src/**").when
    many = step_of("path: [src/**, setup.py]").when
    mapping = step_of("path: {include: src/**, exclude: [docs/**]}").when
    excluded_only = step_of("path: {exclude: '**/*.md'}").when
    assert one and one[0].path and one[0].path.include == ["src/**"]
    assert many and many[0].path and many[0].path.include == ["src/**", "setup.py"]
    assert mapping and mapping[0].path and mapping[0].path.exclude == ["docs/**"]
    assert excluded_only and excluded_only[0].path and excluded_only[0].path.include is None


def test_to_dict_is_plain_json_data() -> None:
    text = THREE_STEPS + "    when: {path: {include: src/**}}\nservices:\n  db: {image: postgres}\n"
    data = parse_pipeline(text).to_dict()
    assert json.loads(json.dumps(data)) == data
    assert list(data) == ["steps", "services", "publish"]
    assert data["steps"][2]["depends_on"] == ["lint", "test"]
    assert data["steps"][2]["when"] == [
        {
            "branch": None,
            "tag": None,
            "event": None,
            "path": {"include": ["src/**"], "exclude": []},
            "status": ["success"],
        }
    ]
    assert data["services"] == [
        {"name": "db", "image": "postgres", "environment": {}, "commands": None}
    ]
    # a build: file keeps the shape it had before steps: existed
    assert list(parse_pipeline("build: {script: make}\n").to_dict()) == ["build", "publish"]


def test_steps_are_frozen() -> None:
    step = parse_pipeline(THREE_STEPS).steps_to_run[0]
    with pytest.raises(pydantic.ValidationError):
        step.name = "other"  # type: ignore[misc]


# --- which format -----------------------------------------------------------------------------


def test_build_and_steps_together_names_the_second() -> None:
    message = error_of(
        """
        build:
          script: make
        steps:
          - {name: test, commands: make test}
        """
    )
    assert message == (
        "ci.yaml line 3: steps: use either build: (one script) or steps: (several), not both"
    )
    reversed_message = error_of("steps:\n  a: {commands: x}\n\nbuild:\n  script: make\n")
    assert reversed_message == (
        "ci.yaml line 4: build: use either build: (one script) or steps: (several), not both"
    )


def test_neither_build_nor_steps_says_what_to_write() -> None:
    message = error_of("services:\n  db: {image: postgres}\n")
    first, example = message.split("; for example:\n")
    assert first == "ci.yaml: needs a build section (one script) or a steps section (several)"
    assert parse_pipeline(example).build is not None
    assert "# steps:\n#   - name: test\n" in example


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[]", "needs at least one step"),
        ("{}", "needs at least one step"),
        (
            "make",
            "must be a list of steps (mappings with a name) or a mapping of step name to step, "
            "not a string",
        ),
        (
            "",
            "must be a list of steps (mappings with a name) or a mapping of step name to step, "
            "not null (nothing)",
        ),
    ],
)
def test_bad_steps_section(value: str, expected: str) -> None:
    assert error_of(f"steps: {value}\n") == f"ci.yaml line 1: steps: {expected}"


# --- names and the graph ----------------------------------------------------------------------


def test_duplicate_step_names_give_both_lines() -> None:
    message = error_of(
        """
        steps:
          - name: lint
            commands: ruff check .
          - name: test
            commands: pytest
          - name: test
            commands: pytest -k slow
        """
    )
    assert (
        message == "ci.yaml line 6: steps[2].name: step name 'test' is used twice (first at line 4)"
    )


def test_unknown_dependency_with_did_you_mean() -> None:
    message = error_of(
        """
        steps:
          - name: test
            commands: pytest
          - name: deploy
            commands: ./deploy.sh
            depends_on:
              - test
              - tset
        """
    )
    assert message == (
        'ci.yaml line 8: steps[1].depends_on[1]: unknown step "tset" (did you mean test?); '
        "steps: test, deploy"
    )


def test_unknown_dependency_written_as_one_name() -> None:
    message = error_of(
        "steps:\n  test: {commands: x}\n  deploy:\n    depends_on: zzz\n    commands: x\n"
    )
    assert message == (
        'ci.yaml line 4: steps.deploy.depends_on: unknown step "zzz"; steps: test, deploy'
    )


def test_self_dependency() -> None:
    message = error_of("steps:\n  - name: test\n    commands: x\n    depends_on: [test]\n")
    assert message == (
        "ci.yaml line 4: steps[0].depends_on[0]: a step cannot depend on itself: remove 'test'"
    )


def test_a_cycle_is_listed_in_order() -> None:
    message = error_of(
        """
        steps:
          - name: build
            commands: make
            depends_on: []
          - name: test
            commands: make test
            depends_on: [build, lint]
          - name: lint
            commands: make lint
            depends_on: test
        """
    )
    assert message == "ci.yaml line 7: steps.depends_on: a cycle: test → lint → test"


def test_a_longer_cycle_starts_at_its_first_step() -> None:
    message = error_of(
        """
        steps:
          a: {commands: x, depends_on: [c]}
          b: {commands: x, depends_on: [a]}
          c: {commands: x, depends_on: [b]}
        """
    )
    assert message == "ci.yaml line 2: steps.depends_on: a cycle: a → c → b → a"


def test_depending_on_a_service_is_explained() -> None:
    message = error_of(
        "services:\n  db: {image: postgres}\nsteps:\n  test: {commands: x, depends_on: db}\n"
    )
    assert message == (
        "ci.yaml line 4: steps.test.depends_on: 'db' is a service, not a step: services start "
        "before every step, so remove it"
    )


def test_depends_on_names_each_step_once() -> None:
    message = error_of("steps:\n  a: {commands: x}\n  b: {commands: x, depends_on: [a, a]}\n")
    assert message == 'ci.yaml line 3: steps.b.depends_on: names "a" twice: remove one'


def test_service_and_step_names_must_differ() -> None:
    message = error_of(
        """
        steps:
          - name: db
            commands: ./migrate
        services:
          - name: cache
            image: redis
          - name: db
            image: postgres
        """
    )
    assert message == (
        "ci.yaml line 7: services[1].name: service name 'db' is also the name of the step at "
        "line 2: services and steps need different names, rename one of them"
    )
    message = error_of("steps:\n  db: {commands: x}\nservices:\n  db: {image: postgres}\n")
    assert message == (
        "ci.yaml line 4: services: service name 'db' is also the name of the step at line 2: "
        "services and steps need different names, rename one of them"
    )


def test_duplicate_service_names() -> None:
    message = error_of(
        """
        steps:
          t: {commands: x}
        services:
          - {name: db, image: a}
          - {name: db, image: b}
        """
    )
    assert message == (
        "ci.yaml line 5: services[1].name: service name 'db' is used twice (first at line 4)"
    )


def test_a_service_named_build_clashes_with_the_build_step() -> None:
    message = error_of("build:\n  script: make\nservices:\n  build: {image: postgres}\n")
    assert message == (
        "ci.yaml line 4: services: service name 'build' is also the name of the step at "
        "line 1: services and steps need different names, rename one of them"
    )


def test_graph_problems_from_python_name_the_fields() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        Pipeline(
            steps=[
                {"name": "a", "commands": "x", "depends_on": "b"},
                {"name": "b", "commands": "x", "depends_on": "a"},
            ]
        )
    assert "steps.depends_on: a cycle: a → b → a" in str(info.value)


# --- bad steps and services -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["'my step'", "-lint", "_lint", "a/b", "x" * 64, "''"])
def test_bad_step_name(name: str) -> None:
    message = error_of(f"steps:\n  - name: {name}\n    commands: make\n")
    shown = name.strip("'")
    shown = shown if len(shown) <= 60 else shown[:57] + "..."  # long values are shortened
    assert message == (
        f'ci.yaml line 2: steps[0].name: "{shown}" is not a valid step name: use letters, '
        "digits, '_', '.' and '-', starting with a letter or digit, at most 63 characters"
    )


def test_bad_step_name_as_a_mapping_key() -> None:
    message = error_of("steps:\n  ok: {commands: x}\n  'not ok': {commands: x}\n")
    assert message == (
        'ci.yaml line 3: steps: "not ok" is not a valid step name: use letters, digits, '
        "'_', '.' and '-', starting with a letter or digit, at most 63 characters"
    )


def test_step_name_is_required_in_a_list() -> None:
    message = error_of("steps:\n  - commands: make\n")
    assert message == "ci.yaml line 2: steps[0].name: this field is required"


def test_a_different_name_inside_a_mapping_entry() -> None:
    message = error_of("steps:\n  test:\n    name: unit\n    commands: make\n")
    assert message == (
        'ci.yaml line 3: steps.test.name: the key above names this step "test": remove name: '
        "(or write the steps as a list)"
    )


@pytest.mark.parametrize("name", ["Redis", "my_db", "db-", "db.local"])
def test_bad_service_name(name: str) -> None:
    message = error_of(f"steps:\n  t: {{commands: x}}\nservices:\n  - name: {name}\n    image: x\n")
    assert message == (
        f'ci.yaml line 4: services[0].name: "{name}" is not a valid service name: it is the '
        "host name the steps connect to, so use lowercase letters, digits and '-', starting "
        "and ending with a letter or digit, at most 63 characters"
    )


def test_service_needs_an_image() -> None:
    message = error_of("steps:\n  t: {commands: x}\nservices:\n  db:\n  cache: {image: redis}\n")
    assert message == "ci.yaml line 4: services.db.image: this field is required"


def test_step_needs_commands_or_a_language() -> None:
    assert error_of("steps:\n  - name: t\n    image: alpine\n") == (
        "ci.yaml line 2: steps[0]: needs commands (or a language with a default script: "
        "go, java, python)"
    )
    assert error_of("steps:\n  t:\n    language: cobol\n") == (
        "ci.yaml line 2: steps.t: needs commands: language 'cobol' has no default script "
        "(languages with one: go, java, python)"
    )


def test_unknown_step_field_with_suggestion() -> None:
    message = error_of("steps:\n  test:\n    commands: make\n    dependson: [x]\n")
    assert message == (
        "ci.yaml line 4: steps.test.dependson: unknown field (did you mean depends_on?); "
        "allowed fields: name, image, language, commands, environment, secrets, timeout, "
        "workdir, directory, when, depends_on, failure"
    )


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("failure", "skip", 'must be fail or ignore, not "skip"'),
        ("failure", "ignored", 'must be fail or ignore, not "ignored" (did you mean ignore?)'),
        ("failure", "true", "must be fail or ignore, not true/false"),
        ("timeout", "soon", 'must be a positive number of seconds or a duration such as "10m"'),
        ("workdir", "src", 'must be an absolute path such as "/workspace", not "src"'),
        ("directory", "../up", 'must stay inside the repository: ".." is not allowed'),
        ("image", "'a b'", 'must be an image reference such as "maven:3.3-jdk-8", without spaces'),
        ("commands", "[]", "needs at least one command"),
        ("environment", "[A=1]", "must be a mapping such as NAME: value, not a list"),
    ],
)
def test_bad_step_fields(field: str, value: str, expected: str) -> None:
    message = error_of(f"steps:\n  test:\n    commands: make\n    {field}: {value}\n")
    if field == "commands":
        message = error_of(f"steps:\n  test:\n    {field}: {value}\n")
        assert message == f"ci.yaml line 3: steps.test.{field}: {expected}"
    else:
        assert message == f"ci.yaml line 4: steps.test.{field}: {expected}"


def test_a_command_given_alone_is_reported_without_an_index() -> None:
    message = error_of("steps:\n  test:\n    commands: '  '\n")
    assert message == "ci.yaml line 3: steps.test.commands: is empty: remove it or write a command"


# --- when: parsing ----------------------------------------------------------------------------


def test_unknown_when_key_with_suggestion() -> None:
    message = error_of("steps:\n  test:\n    commands: make\n    when:\n      branches: main\n")
    assert message == (
        "ci.yaml line 5: steps.test.when.branches: unknown field (did you mean branch?); "
        "allowed fields: branch, tag, event, path, status"
    )
    message = error_of(
        "steps:\n  - name: t\n    commands: x\n    when:\n      - branch: main\n      - evnt: tag\n"
    )
    assert message == (
        "ci.yaml line 6: steps[0].when[1].evnt: unknown field (did you mean event?); "
        "allowed fields: branch, tag, event, path, status"
    )


EVENTS = "must be push, tag or merge_request"


@pytest.mark.parametrize(
    ("when", "where", "expected"),
    [
        ("event: pull", "when.event", f'{EVENTS}, not "pull"'),
        (
            "event: pull_request",
            "when.event",
            f'{EVENTS}, not "pull_request" (did you mean merge_request?)',
        ),
        ("event: pushh", "when.event", f'{EVENTS}, not "pushh" (did you mean push?)'),
        ("event: [push, 1]", "when.event[1]", f"{EVENTS}, not a number"),
        (
            "status: failed",
            "when.status",
            'must be success or failure, not "failed" (did you mean failure?)',
        ),
        ("status: []", "when.status", "needs at least one value: a status (success or failure)"),
        (
            "branch: {a: b}",
            "when.branch",
            'must be a branch pattern such as "release/*" or a list of them, not a mapping',
        ),
        (
            "tag: 1",
            "when.tag",
            'must be a tag pattern such as "v*" or a list of them, not a number',
        ),
        (
            "path: /src/**",
            "when.path",
            'must be relative to the repository root, such as "src/**", not "/src/**"',
        ),
        ("path: {include: []}", "when.path.include", 'needs at least one pattern such as "src/**"'),
        ("path: {}", "when.path", 'needs include or exclude patterns, such as include: ["src/**"]'),
        (
            "path: {includes: a}",
            "when.path.includes",
            "unknown field (did you mean include?); allowed fields: include, exclude",
        ),
        (
            "path: 3",
            "when.path",
            'must be a pattern such as "src/**", a list of patterns or a mapping with include '
            "and exclude, not a number",
        ),
    ],
)
def test_bad_when_values(when: str, where: str, expected: str) -> None:
    message = error_of(f"steps:\n  test:\n    commands: make\n    when:\n      {when}\n")
    assert message == f"ci.yaml line 5: steps.test.{where}: {expected}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[]", "needs at least one condition, or remove when:"),
        (
            "main",
            "must be a condition (a mapping such as {branch: main}) or a list of conditions, "
            "not a string",
        ),
    ],
)
def test_bad_when(value: str, expected: str) -> None:
    message = error_of(f"steps:\n  test:\n    commands: make\n    when: {value}\n")
    assert message == f"ci.yaml line 4: steps.test.when: {expected}"


def test_when_item_that_is_not_a_mapping() -> None:
    message = error_of("steps:\n  test:\n    commands: make\n    when: [main]\n")
    assert message == (
        "ci.yaml line 4: steps.test.when[0]: must be a mapping with the fields "
        "branch, tag, event, path, status, not a string"
    )


# --- when: decisions --------------------------------------------------------------------------


def test_no_when_runs_unless_an_earlier_step_failed() -> None:
    step = parse_pipeline(THREE_STEPS).steps_to_run[0]
    assert step.skip_reason(context()) is None
    assert step.skip_reason(context(event="tag", branch=None, tag="v1")) is None
    assert step.skip_reason(context(failed=True)) == "an earlier step failed"


def test_branch_patterns() -> None:
    step = step_of("branch: [main, release/*]")
    assert step.skip_reason(context(branch="main")) is None
    assert step.skip_reason(context(branch="release/1.2")) is None
    assert step.skip_reason(context(branch="feature/x")) == (
        "when: branch feature/x matches none of main, release/*"
    )
    assert step.skip_reason(context(event="tag", branch=None, tag="v1.0")) == (
        "when: branch main, release/* is for branch builds, not tag v1.0"
    )


def test_branch_matches_a_merge_requests_source_branch() -> None:
    step = step_of("branch: feature/*")
    assert step.skip_reason(context(event="merge_request", branch="feature/login")) is None


def test_tag_patterns() -> None:
    step = step_of("tag: v*")
    assert step.skip_reason(context(event="tag", branch=None, tag="v1.0")) is None
    assert step.skip_reason(context(event="tag", branch=None, tag="nightly")) == (
        "when: tag nightly matches none of v*"
    )
    assert step.skip_reason(context(branch="main")) == (
        "when: tag v* is for tag builds, not branch main"
    )


def test_event() -> None:
    step = step_of("event: [push, tag]")
    assert step.skip_reason(context(event="push")) is None
    assert step.skip_reason(context(event="tag", branch=None, tag="v1")) is None
    assert step.skip_reason(context(event="merge_request")) == (
        "when: event merge_request is not push or tag"
    )
    assert step_of("event: tag").skip_reason(context()) == "when: event push is not tag"


def test_path_include_with_globstar() -> None:
    step = step_of("path: src/**")
    assert step.skip_reason(context(changed=("README.md", "src/app/deep/main.py"))) is None
    assert step.skip_reason(context(changed=("src/main.py",))) is None
    assert step.skip_reason(context(changed=("docs/index.md", "srcx/a.py"))) == (
        "when: no changed file matches src/**"
    )
    assert step.skip_reason(context(changed=())) == "when: no changed file matches src/**"


def test_path_single_star_stays_in_one_directory() -> None:
    step = step_of("path: ['*.md', 'docs/*']")
    assert step.skip_reason(context(changed=("README.md",))) is None
    assert step.skip_reason(context(changed=("docs/index.rst",))) is None
    assert step.skip_reason(context(changed=("src/notes.md", "docs/api/x.rst"))) == (
        "when: no changed file matches *.md, docs/*"
    )
    assert step_of("path: '**/*.md'").skip_reason(context(changed=("a/b/c.md",))) is None


def test_path_include_and_exclude() -> None:
    step = step_of("path:\n  include: [src/**]\n  exclude: ['**/*.md', src/vendor/**]")
    assert step.skip_reason(context(changed=("src/README.md", "src/a.py"))) is None
    assert step.skip_reason(context(changed=("src/README.md", "src/vendor/x/y.go"))) == (
        "when: every changed file that matches src/** is excluded (**/*.md, src/vendor/**)"
    )
    assert step.skip_reason(context(changed=("setup.py",))) == (
        "when: no changed file matches src/**"
    )


def test_path_exclude_only_means_every_other_file() -> None:
    step = step_of("path: {exclude: 'docs/**'}")
    assert step.skip_reason(context(changed=("docs/a.md", "main.go"))) is None
    assert step.skip_reason(context(changed=("docs/a.md",))) == (
        "when: every changed file is excluded (docs/**)"
    )
    assert step.skip_reason(context(changed=())) == "when: no file changed"


def test_path_with_unknown_changed_files_matches() -> None:
    step = step_of("path: src/**\nbranch: main")
    assert step.skip_reason(context(branch="main", changed=None)) is None
    tag_build = step_of("path: src/**").skip_reason(
        context(event="tag", branch=None, tag="v1", changed=None)
    )
    assert tag_build is None


def test_status_defaults_to_success() -> None:
    step = step_of("branch: main")
    assert step.skip_reason(context(failed=True)) == "an earlier step failed"


def test_status_failure_runs_only_after_a_failure() -> None:
    step = step_of("status: failure")
    assert step.skip_reason(context(failed=True)) is None
    assert step.skip_reason(context(failed=False)) == (
        "runs only after a failure (when.status: failure)"
    )


def test_status_success_and_failure_runs_always() -> None:
    step = step_of("status: [success, failure]")
    assert step.skip_reason(context(failed=True)) is None
    assert step.skip_reason(context(failed=False)) is None
    step = step_of("status: [failure, success]\nbranch: main")
    assert step.skip_reason(context(branch="dev", failed=True)) == (
        "when: branch dev matches none of main"
    )


def test_keys_of_one_condition_are_anded() -> None:
    step = step_of("branch: main\nevent: push\npath: src/**")
    assert step.skip_reason(context(branch="main", changed=("src/a.py",))) is None
    assert step.skip_reason(context(event="merge_request", changed=("src/a.py",))) == (
        "when: event merge_request is not push"
    )
    assert step.skip_reason(context(branch="dev", changed=("src/a.py",))) == (
        "when: branch dev matches none of main"
    )
    assert step.skip_reason(context(changed=("doc.md",))) == (
        "when: no changed file matches src/**"
    )


def test_conditions_are_ored() -> None:
    step = step_of("- branch: main\n- tag: v*\n- status: failure")
    assert step.skip_reason(context(branch="main")) is None
    assert step.skip_reason(context(event="tag", branch=None, tag="v2")) is None
    assert step.skip_reason(context(branch="dev", failed=True)) is None
    assert step.skip_reason(context(branch="dev")) == (
        "when: no condition holds (branch dev matches none of main; "
        "tag v* is for tag builds, not branch dev; "
        "runs only after a failure (when.status: failure))"
    )


def test_conditions_with_the_same_reason_give_it_once() -> None:
    step = step_of("- branch: main\n- branch: dev")
    assert step.skip_reason(context(failed=True)) == "an earlier step failed"


def test_context_refuses_an_unknown_event() -> None:
    with pytest.raises(ValueError, match="event must be push, tag or merge_request, not 'pull'"):
        context(event="pull")


# --- matrix ---------------------------------------------------------------------------------

MATRIX = """\
matrix:
  GO: [1.19, "1.20"]
  DB: [mariadb, postgres]
steps:
  - name: test
    commands: [echo $GO $DB]
  - name: report
    commands: [echo done]
"""


def test_a_matrix_runs_every_step_once_per_combination():
    pipeline = parse_pipeline(MATRIX)
    names = [step.name for step in pipeline.steps_to_run]
    assert names[:2] == ["test [GO=1.19, DB=mariadb]", "report [GO=1.19, DB=mariadb]"]
    assert len(names) == 8 and len(set(names)) == 8
    assert pipeline.steps_to_run[2].environment == {"GO": "1.19", "DB": "postgres"}  # verbatim
    # In file order within each combination; the combinations side by side.
    deps = pipeline.dependencies
    assert deps["test [GO=1.20, DB=mariadb]"] == ()
    assert deps["report [GO=1.20, DB=mariadb]"] == ("test [GO=1.20, DB=mariadb]",)
    assert pipeline.combination_of("report [GO=1.20, DB=postgres]") == "GO=1.20, DB=postgres"
    assert pipeline.to_dict()["matrix"] == {"GO": ["1.19", "1.20"], "DB": ["mariadb", "postgres"]}


def test_a_matrix_keeps_depends_on_inside_each_combination():
    pipeline = parse_pipeline(
        "matrix:\n  V: [a, b]\nsteps:\n  - name: one\n    commands: [x]\n"
        "  - name: two\n    commands: [y]\n    depends_on: [one]\n"
    )
    assert pipeline.dependencies["two [V=b]"] == ("one [V=b]",)


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ("matrix: [a, b]", "must be a mapping of variable names to lists of values"),
        ("matrix:\n  V: []", '"V" must be a list of one or more values'),
        ("matrix:\n  V: [a, a]", '"V" lists a value twice'),
        ("matrix:\n  1V: [a]", "is not a valid name"),
        ("matrix:\n  A: [1, 2, 3, 4, 5]\n  B: [1, 2, 3, 4]", "makes 20 combinations; at most 16"),
        ("matrix:\n  V: [" + "x" * 60 + "]", "matrix: its values make step names of"),
    ],
)
def test_matrix_mistakes_are_named(matrix, message):
    with pytest.raises(PipelineError) as error:
        parse_pipeline(matrix + "\nsteps:\n  - name: test\n    commands: [x]\n")
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("clone", "depth"), [("", 1), ("clone:\n  depth: full\n", "full"), ("clone: {depth: 50}\n", 50)]
)
def test_clone_depth(clone, depth):
    assert parse_pipeline(clone + "build:\n  script: x\n").clone.depth == depth


@pytest.mark.parametrize("value", ["0", "-1", "deep", "true", "2000000"])
def test_a_bad_clone_depth_is_named(value):
    with pytest.raises(PipelineError, match=r'clone\.depth: must be "full" or a number'):
        parse_pipeline(f"clone:\n  depth: {value}\nbuild:\n  script: x\n")
