"""Tests for :mod:`cicd.ciyaml`: real ci.yaml text in, a Pipeline or an exact error message out."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pydantic
import pytest

from cicd.ciyaml import (
    CI_FILENAME,
    MAX_CI_YAML_BYTES,
    BuildSpec,
    Pipeline,
    PublishSpec,
    load_pipeline,
    parse_pipeline,
)
from cicd.errors import PipelineError

ORIGINAL = """\
build:
  language: java
  image: maven:3.3-jdk-8
  workdir: /usr/src/mymaven
  script: mvn package -Dmaven.test.skip=true
"""


def yaml_doc(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def error_of(text: str | bytes, filename: str = "ci.yaml") -> str:
    """The message parse_pipeline raises for ``text``; fails the test if it parses."""
    if isinstance(text, str):
        text = yaml_doc(text)
    with pytest.raises(PipelineError) as info:
        parse_pipeline(text, filename)
    return str(info.value)


# --- valid files ------------------------------------------------------------------------------


def test_original_format_parses_verbatim() -> None:
    pipeline = parse_pipeline(ORIGINAL)
    assert pipeline == Pipeline(
        build=BuildSpec(
            language="java",
            image="maven:3.3-jdk-8",
            workdir="/usr/src/mymaven",
            script=["mvn package -Dmaven.test.skip=true"],
        )
    )
    assert pipeline.publish is None
    assert pipeline.build.env == {}
    assert pipeline.build.timeout is None


def test_bytes_and_bom_parse_like_text() -> None:
    assert parse_pipeline(ORIGINAL.encode()) == parse_pipeline(ORIGINAL)
    assert parse_pipeline(b"\xef\xbb\xbf" + ORIGINAL.encode()) == parse_pipeline(ORIGINAL)


def test_to_dict_is_plain_json_data() -> None:
    data = parse_pipeline("build: {script: make, timeout: 10m}\npublish: true\n").to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "build": {
            "language": None,
            "image": None,
            "workdir": "/workspace",
            "script": ["make"],
            "env": {},
            "timeout": 600,
            "secrets": [],
        },
        "publish": {
            "dockerfile": "Dockerfile",
            "context": ".",
            "build_args": {},
            "approval": False,
        },
    }


def test_script_as_list() -> None:
    pipeline = parse_pipeline(
        yaml_doc(
            """
            build:
              script:
                - ./configure
                - make -j4
                - |
                  echo multi
                  echo line
            """
        )
    )
    assert pipeline.build.script == ["./configure", "make -j4", "echo multi\necho line\n"]


def test_env_values_become_strings() -> None:
    pipeline = parse_pipeline(
        yaml_doc(
            """
            build:
              script: make
              env:
                NAME: plain
                COUNT: 3
                PYTHON: 3.10
                MODE: 010
                RATIO: 1.5e3
                DEBUG: true
                QUIET: false
                LEGACY: yes
                EMPTY: ""
                DAY: 2024-01-31
                ON: "key is read as a string"
            """
        )
    )
    assert pipeline.build.env == {
        "NAME": "plain",
        "COUNT": "3",
        "PYTHON": "3.10",  # as written: float() would make it "3.1"
        "MODE": "010",  # as written: YAML 1.1 would make it octal 8
        "RATIO": "1.5e3",
        "DEBUG": "true",
        "QUIET": "false",
        "LEGACY": "true",
        "EMPTY": "",
        "DAY": "2024-01-31",
        "ON": "key is read as a string",
    }


def test_env_from_python_converts_scalars() -> None:
    spec = BuildSpec(script="make", env={"A": 1.5, "B": True, "C": 7})
    assert spec.env == {"A": "1.5", "B": "true", "C": "7"}
    assert spec.script == ["make"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90", 90),
        ("'90'", 90),
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2h5m10s", 7510),
        ("90m", 5400),
        ("1", 1),
        ("24h", 86400),
        ("86400", 86400),
        ("~", None),
    ],
)
def test_timeout_forms(value: str, seconds: int | None) -> None:
    pipeline = parse_pipeline(f"build:\n  script: make\n  timeout: {value}\n")
    assert pipeline.build.timeout == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10x", 'must be a positive number of seconds or a duration such as "10m"'),
        ('""', 'must be a positive number of seconds or a duration such as "10m"'),
        ("1h 30m", 'must be a positive number of seconds or a duration such as "10m"'),
        ("m", 'must be a positive number of seconds or a duration such as "10m"'),
        ("1.5", 'must be a positive number of seconds or a duration such as "10m"'),
        ("true", 'must be a positive number of seconds or a duration such as "10m"'),
        ("[10]", 'must be a positive number of seconds or a duration such as "10m"'),
        ("0", 'must be between 1 second and 24 hours ("24h"), not 0'),
        ("-5", 'must be between 1 second and 24 hours ("24h"), not -5'),
        ("0s", 'must be between 1 second and 24 hours ("24h"), not 0s'),
        ("25h", 'must be between 1 second and 24 hours ("24h"), not 25h'),
        ("86401", 'must be between 1 second and 24 hours ("24h"), not 86401'),
    ],
)
def test_bad_timeouts_name_line_and_field(value: str, expected: str) -> None:
    text = f"build:\n  script: make\n\n  timeout: {value}\n"
    assert error_of(text) == f"ci.yaml line 4: build.timeout: {expected}"


def test_publish_omitted_false_null_true_and_mapping() -> None:
    base = "build:\n  script: make\n"
    assert parse_pipeline(base).publish is None
    assert parse_pipeline(base + "publish: false\n").publish is None
    assert parse_pipeline(base + "publish:\n").publish is None
    assert parse_pipeline(base + "publish: true\n").publish == PublishSpec()
    assert parse_pipeline(base + "publish: {}\n").publish == PublishSpec()
    publish = parse_pipeline(
        base
        + yaml_doc(
            """
            publish:
              dockerfile: docker/app.Dockerfile
              context: ./app
              build_args:
                VERSION: 1.20
                FAST: true
            """
        )
    ).publish
    assert publish == PublishSpec(
        dockerfile="docker/app.Dockerfile",
        context="./app",
        build_args={"VERSION": "1.20", "FAST": "true"},
    )


def test_anchors_and_merge_keys_are_allowed() -> None:
    pipeline = parse_pipeline(
        yaml_doc(
            """
            build:
              script: make
              env: &common
                REGION: eu
                <<: {LEVEL: 2.50}
            publish:
              build_args: *common
            """
        )
    )
    assert pipeline.build.env == {"REGION": "eu", "LEVEL": "2.50"}
    assert pipeline.publish is not None
    assert pipeline.publish.build_args == pipeline.build.env


def test_models_are_frozen() -> None:
    pipeline = parse_pipeline(ORIGINAL)
    with pytest.raises(pydantic.ValidationError):
        pipeline.build.image = "alpine"  # type: ignore[misc]


# --- invalid fields ---------------------------------------------------------------------------


def test_bad_env_key_names_line_and_field() -> None:
    message = error_of(
        """
        build:
          script: make
          env:
            GOOD: 1
            1BAD: x
        """
    )
    assert message == (
        'ci.yaml line 5: build.env: "1BAD" is not a valid name: '
        "use letters, digits and _, not starting with a digit"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", 'has no value: write "" for an empty string'),
        ("[a, b]", "must be a string, number or true/false, not a list"),
        ("{a: b}", "must be a string, number or true/false, not a mapping"),
    ],
)
def test_bad_env_values(value: str, expected: str) -> None:
    message = error_of(f"build:\n  script: make\n  env:\n    A: ok\n    SECRET: {value}\n")
    assert message == f"ci.yaml line 5: build.env.SECRET: {expected}"


def test_env_as_list_is_explained() -> None:
    message = error_of("build:\n  script: make\n  env:\n    - A=1\n")
    assert message == "ci.yaml line 3: build.env: must be a mapping such as NAME: value, not a list"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("src", 'must be an absolute path such as "/workspace", not "src"'),
        ("./src", 'must be an absolute path such as "/workspace", not "./src"'),
        ("/usr/../etc", 'must not contain ".."'),
        ("/work/..", 'must not contain ".."'),
        ("/", 'must not be "/" itself: use a directory such as "/workspace"'),
        ('"/a\\nb"', "must not contain control characters such as newline, tab or NUL"),
        ('"/a\\0b"', "must not contain control characters such as newline, tab or NUL"),
    ],
)
def test_bad_workdir(value: str, expected: str) -> None:
    message = error_of(f"build:\n  script: make\n  workdir: {value}\n")
    assert message == f"ci.yaml line 3: build.workdir: {expected}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("'maven 3'", 'must be an image reference such as "maven:3.3-jdk-8", without spaces'),
        ('"a\\tb"', 'must be an image reference such as "maven:3.3-jdk-8", without spaces'),
        ('""', 'must not be empty: name an image such as "maven:3.3-jdk-8"'),
        ("--privileged", 'must not start with "-"'),
        ("3.3", "must be a string, not a number"),
    ],
)
def test_bad_image(value: str, expected: str) -> None:
    message = error_of(f"build:\n  image: {value}\n  script: make\n")
    assert message == f"ci.yaml line 2: build.image: {expected}"


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("dockerfile", "/etc/Dockerfile", "must be relative to the repository root"),
        ("dockerfile", "../Dockerfile", 'must stay inside the repository: ".." is not allowed'),
        ("context", "a/../../b", 'must stay inside the repository: ".." is not allowed'),
        ("context", "'a\\b'", 'must use "/" between directories, not "\\"'),
        ("context", "--network=host", 'must not start with "-"'),
        ("context", '""', "must not be empty"),
    ],
)
def test_bad_publish_paths(field: str, value: str, expected: str) -> None:
    message = error_of(f"build:\n  script: make\npublish:\n  {field}: {value}\n")
    assert message.startswith(f"ci.yaml line 4: publish.{field}: {expected}")


def test_publish_of_wrong_type() -> None:
    message = error_of("build:\n  script: make\npublish: docker\n")
    assert message == (
        "ci.yaml line 3: publish: must be true, false or a mapping "
        "(dockerfile, context, build_args), not a string"
    )


def test_script_items_must_be_nonempty_strings() -> None:
    message = error_of(
        """
        build:
          script:
            - make
            - 42
            - true
            - echo result: ok
            - "  "
        """
    )
    assert message == "\n".join(
        [
            "ci.yaml is invalid (4 problems):",
            "  ci.yaml line 4: build.script[1]: must be a string, not a number: "
            "put the command in quotes",
            "  ci.yaml line 5: build.script[2]: must be a string, not true/false: "
            "put the command in quotes",
            "  ci.yaml line 6: build.script[3]: must be a string, not a mapping: quote commands "
            'that contain ": "',
            "  ci.yaml line 7: build.script[4]: is empty: remove it or write a command",
        ]
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("[]", "needs at least one command"),
        ("", "must be a command or a list of commands, not null (nothing)"),
        ("42", "must be a command or a list of commands, not a number"),
    ],
)
def test_bad_script(value: str, expected: str) -> None:
    assert error_of(f"build:\n  script: {value}\n") == f"ci.yaml line 2: build.script: {expected}"


def test_unknown_key_is_reported_with_line_and_suggestion() -> None:
    message = error_of(
        """
        build:
          image: alpine
          script: make
          timout: 10m
        """
    )
    assert message == (
        "ci.yaml line 4: build.timout: unknown field (did you mean timeout?); "
        "allowed fields: language, image, workdir, script, env, timeout, secrets"
    )


def test_several_problems_are_listed_in_file_order() -> None:
    message = error_of(
        """
        stages: [build]
        build:
          scirpt: make
          workdir: src
        """
    )
    assert message.splitlines() == [
        "ci.yaml is invalid (3 problems):",
        "  ci.yaml line 1: stages: unknown field (did you mean steps?); "
        "allowed fields: build, steps, services, clone, cache, matrix, publish",
        "  ci.yaml line 3: build.scirpt: unknown field (did you mean script?); "
        "allowed fields: language, image, workdir, script, env, timeout, secrets",
        '  ci.yaml line 4: build.workdir: must be an absolute path such as "/workspace", not "src"',
    ]


def test_language_alone_brings_its_default_script() -> None:
    for language in ("java", "go", "python"):
        spec = parse_pipeline(f"build:\n  language: {language}\n").build
        assert spec.script is None
        assert spec.commands and all(isinstance(c, str) and c for c in spec.commands)
    spec = parse_pipeline("build:\n  language: java\n  script: make\n").build
    assert spec.commands == ["make"]
    assert error_of("build:\n  language: cobol\n") == (
        "ci.yaml line 1: build: needs a script: language 'cobol' has no default script "
        "(languages with one: go, java, python)"
    )


def test_problems_are_capped_at_ten() -> None:
    env = "".join(f"    V{i}: [x]\n" for i in range(12))
    lines = error_of(f"build:\n  script: make\n  env:\n{env}").splitlines()
    assert lines[0] == "ci.yaml is invalid (12 problems):"
    assert len(lines) == 12  # summary, ten problems, "... and 2 more"
    assert lines[1].startswith("  ci.yaml line 4: build.env.V0: ")
    assert lines[10].startswith("  ci.yaml line 13: build.env.V9: ")
    assert lines[11] == "  ... and 2 more"


def test_missing_build() -> None:
    message = error_of("publish: true\n")
    assert message.startswith(
        "ci.yaml: needs a build section (one script) or a steps section (several); "
        "for example:\nbuild:\n"
    )
    example = message.split("for example:\n", 1)[1]
    assert parse_pipeline(example).build.script
    steps = "\n".join(line.removeprefix("# ") for line in example.splitlines()[5:])
    assert [step.name for step in parse_pipeline(steps).steps_to_run] == ["test", "docs"]


def test_missing_script_points_at_build() -> None:
    message = error_of("# comment\nbuild:\n  image: alpine\n")
    assert message == (
        "ci.yaml line 2: build: needs a script (or a language with a default script: "
        "go, java, python)"
    )


def test_build_that_is_not_a_mapping() -> None:
    message = error_of("build: make\n")
    assert message == (
        "ci.yaml line 1: build: must be a mapping with the fields "
        "language, image, workdir, script, env, timeout, secrets, not a string"
    )


def test_filename_prefixes_messages() -> None:
    assert error_of("publish: true\n", filename="x/ci.yaml").startswith(
        "x/ci.yaml: needs a build section (one script) or a steps section (several); "
    )


# --- invalid documents ------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column() -> None:
    message = error_of("build:\n  script: make\n  image: a: b\n")
    assert (
        message
        == "ci.yaml line 3, column 11: YAML syntax error: mapping values are not allowed here"
    )


def test_tab_indentation_is_explained() -> None:
    message = error_of("build:\n\tscript: make\n")
    assert message == (
        "ci.yaml line 2, column 1: YAML syntax error: found character '\\t' that cannot "
        "start any token (indent with spaces, not tabs)"
    )


def test_two_documents_are_refused() -> None:
    message = error_of("build: {script: a}\n---\nbuild: {script: b}\n")
    assert message == (
        "ci.yaml line 2, column 1: YAML syntax error: "
        "expected a single document in the stream, but found another document"
    )


def test_control_character_is_refused_with_position() -> None:
    message = error_of("build:\n  script: ma\x07ke\n")
    assert (
        message == "ci.yaml line 2, column 13: character U+0007 is not allowed in YAML: remove it"
    )


def test_python_tags_are_refused() -> None:
    message = error_of("build:\n  script: !!python/object/apply:os.system [id]\n")
    assert message.startswith("ci.yaml line 2, column 11: YAML error: could not determine")


def test_duplicate_keys_are_refused() -> None:
    message = error_of("build:\n  script: make\n  image: a\n  script: test\n")
    assert message == (
        'ci.yaml line 4: duplicate key "script", already set on line 2: remove one of them'
    )


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing here\n"])
def test_empty_file(text: str) -> None:
    message = error_of(text)
    assert message.startswith(
        "ci.yaml is empty: the top level must be a mapping with a build section; for example:\n"
    )
    assert parse_pipeline(message.split("for example:\n", 1)[1]).build.script


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- build\n- publish\n", "a list"), ("make\n", "a string"), ("~\n", "null (nothing)")],
)
def test_top_level_not_a_mapping(text: str, kind: str) -> None:
    message = error_of(text)
    assert message.startswith(
        f"ci.yaml line 1: the top level must be a mapping with a build section, not {kind}; "
    )


def test_non_utf8_bytes() -> None:
    message = error_of(b"build:\n  script: echo caf\xe9\n")
    assert message == "ci.yaml line 2: the file is not valid UTF-8 (byte 0xe9): save it as UTF-8"


def test_oversized_text_and_bytes() -> None:
    text = "build:\n  script: make\n#" + "x" * MAX_CI_YAML_BYTES + "\n"
    size = len(text)
    expected = f"ci.yaml is too big ({size} bytes; the limit is {MAX_CI_YAML_BYTES}): "
    assert error_of(text).startswith(expected)
    assert error_of(text.encode()).startswith(expected)
    # counted in bytes, not characters: 2-byte characters reach the limit at half the length
    assert error_of("#" + "é" * (MAX_CI_YAML_BYTES // 2)).startswith("ci.yaml is too big")


def test_billion_laughs_is_refused() -> None:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 9):
        refs = ", ".join([f"*a{i - 1}"] * 10)
        lines.append(f"a{i}: &a{i} [{refs}]")
    message = error_of("\n".join(lines) + "\n")
    assert message == (
        "ci.yaml: the YAML expands to more than 10000 values through anchors "
        "and aliases: simplify it"
    )


def test_recursive_alias_is_refused() -> None:
    message = error_of("build:\n  script: make\n  env: &loop\n    A: *loop\n")
    assert message == (
        "ci.yaml line 3: this anchored mapping or list contains an alias to itself: remove the loop"
    )


def test_deep_nesting_is_refused() -> None:
    assert error_of("[" * 5000) == "ci.yaml: the YAML is nested too deeply"


# --- load_pipeline ----------------------------------------------------------------------------


def test_load_pipeline_reads_the_root_file(tmp_path: Path) -> None:
    (tmp_path / CI_FILENAME).write_text(ORIGINAL)
    assert load_pipeline(tmp_path) == parse_pipeline(ORIGINAL)


def test_load_pipeline_missing_file(tmp_path: Path) -> None:
    (tmp_path / "README").write_text("hello\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(tmp_path)
    message = str(info.value)
    first, *example = message.splitlines()
    assert first == "no ci.yaml at the repository root: add one, e.g."
    assert len(example) == 4
    assert parse_pipeline("\n".join(example)).build.image == "maven:3.3-jdk-8"


def test_load_pipeline_names_a_near_miss(tmp_path: Path) -> None:
    (tmp_path / "ci.yml").write_text(ORIGINAL)
    with pytest.raises(PipelineError, match=r"^no ci.yaml at the repository root \(found ci.yml"):
        load_pipeline(tmp_path)


def test_load_pipeline_refuses_symlink_outside(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("build:\n  script: hunter2-password\n")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / CI_FILENAME).symlink_to(secret)
    with pytest.raises(PipelineError) as info:
        load_pipeline(checkout)
    message = str(info.value)
    assert message == (
        "ci.yaml is a symlink that points outside the repository: commit it as a regular file"
    )
    assert "hunter2" not in message


def test_load_pipeline_refuses_relative_symlink_escaping(tmp_path: Path) -> None:
    (tmp_path / "other.yaml").write_text(ORIGINAL)
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / CI_FILENAME).symlink_to("../other.yaml")
    with pytest.raises(PipelineError, match="points outside the repository"):
        load_pipeline(checkout)


def test_load_pipeline_follows_symlink_inside(tmp_path: Path) -> None:
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "pipeline.yaml").write_text(ORIGINAL)
    (tmp_path / CI_FILENAME).symlink_to("ci/pipeline.yaml")
    assert load_pipeline(tmp_path).build.language == "java"


def test_load_pipeline_refuses_a_directory(tmp_path: Path) -> None:
    (tmp_path / CI_FILENAME).mkdir()
    with pytest.raises(PipelineError, match=r"^ci.yaml at the repository root is not a regular"):
        load_pipeline(tmp_path)


def test_load_pipeline_oversized(tmp_path: Path) -> None:
    (tmp_path / CI_FILENAME).write_bytes(b"#" * (MAX_CI_YAML_BYTES + 10))
    with pytest.raises(PipelineError) as info:
        load_pipeline(tmp_path)
    assert str(info.value).startswith(
        f"ci.yaml is too big ({MAX_CI_YAML_BYTES + 10} bytes; the limit is {MAX_CI_YAML_BYTES})"
    )


def test_load_pipeline_reports_line_of_invalid_file(tmp_path: Path) -> None:
    (tmp_path / CI_FILENAME).write_text("build:\n  script: make\n  timeout: soon\n")
    with pytest.raises(PipelineError) as info:
        load_pipeline(tmp_path)
    assert str(info.value).startswith("ci.yaml line 3: build.timeout: ")
