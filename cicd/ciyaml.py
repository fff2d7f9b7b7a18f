"""Parse a repository's ``ci.yaml`` into a validated, immutable pipeline spec.

``ci.yaml`` is written by whoever pushes, so it is untrusted input and the most
common reason a build fails before it starts. This module turns it into plain
frozen data (:class:`Pipeline`) that the stages can rely on, and turns every
mistake into one :class:`~cicd.errors.PipelineError` whose message names the
file, the line and the field and says how to fix it: that message is what the
pusher reads in the build log.

The YAML itself is read by :mod:`cicd.yamldoc` (safe loader, a node tree with
line numbers); this module is the spec: the fields, their checks, and messages
in the terms of the file.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from wcmatch import glob as wcglob
from yaml.nodes import Node

from cicd import yamldoc
from cicd.errors import PipelineError
from cicd.languages import LANGUAGES
from cicd.yamldoc import describe, quote

__all__ = [
    "CI_FILENAME",
    "MAX_CI_YAML_BYTES",
    "BuildSpec",
    "CloneSpec",
    "CacheSpec",
    "StepSpec",
    "ServiceSpec",
    "WhenCondition",
    "PathFilter",
    "StepContext",
    "PublishSpec",
    "Pipeline",
    "parse_pipeline",
    "load_pipeline",
]

CI_FILENAME = "ci.yaml"
#: A pipeline spec is a few lines; anything bigger is a mistake or an attack.
MAX_CI_YAML_BYTES = 256 * 1024
#: Nodes visited while following aliases; a real ci.yaml has a few dozen.
_MAX_PROBLEMS = 10
_MAX_TIMEOUT = 24 * 60 * 60

_EXAMPLE = (
    "build:\n"
    "  image: maven:3.3-jdk-8\n"
    "  workdir: /usr/src/mymaven\n"
    "  script: mvn package -Dmaven.test.skip=true"
)
#: Appended to :data:`_EXAMPLE` in messages as YAML comments, so the example still parses.
_STEPS_EXAMPLE = (
    "# or, to run several steps, write steps: instead of build:\n"
    "# steps:\n"
    "#   - name: test\n"
    "#     image: python:3.12\n"
    "#     commands: python3 -m unittest\n"
    "#   - name: docs\n"
    "#     image: python:3.12\n"
    "#     commands: make -C docs html"
)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_RE = re.compile(r"(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE_OR_CONTROL_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
#: Mappings whose values are environment text: ``3.10`` stays "3.10", ``010`` is not 8.
_VERBATIM = (
    ("build", "env"),
    ("publish", "build_args"),
    ("steps", "*", "environment"),
    ("services", "*", "environment"),
    ("matrix", "*"),
)
_STEP_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOST_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_EVENTS = ("push", "tag", "merge_request")
_STATUSES = ("success", "failure")
#: ``**`` spans directories and a changed dotfile is a changed file; ``/`` on every platform.
_PATH_FLAGS = wcglob.GLOBSTAR | wcglob.DOTGLOB | wcglob.FORCEUNIX
_BAD_TIMEOUT = 'must be a positive number of seconds or a duration such as "10m"'


# --- value checks shared by the models ------------------------------------------------------


def _one_line(value: str) -> str:
    """Reject control characters: they cannot be passed on a command line or shown in a log."""
    if _CONTROL_RE.search(value):
        raise ValueError("must not contain control characters such as newline, tab or NUL")
    if not value:
        raise ValueError("must not be empty")
    return value


def _image(value: str) -> str:
    """An image reference is one token; a leading ``-`` would be read as a docker option."""
    if _SPACE_OR_CONTROL_RE.search(value):
        raise ValueError('must be an image reference such as "maven:3.3-jdk-8", without spaces')
    if not value:
        raise ValueError('must not be empty: name an image such as "maven:3.3-jdk-8"')
    if value.startswith("-"):
        raise ValueError('must not start with "-"')
    return value


def _workdir(value: str) -> str:
    """The directory inside the container where the checkout is mounted and the script runs."""
    _one_line(value)
    if not value.startswith("/"):
        raise ValueError(f'must be an absolute path such as "/workspace", not {quote(value)}')
    if ".." in value.split("/"):
        raise ValueError('must not contain ".."')
    if not value.strip("/"):
        raise ValueError('must not be "/" itself: use a directory such as "/workspace"')
    return value


def _repo_path(value: str) -> str:
    """A path inside the checkout: relative, forward slashes, no way out of the repository."""
    _one_line(value)
    if "\\" in value:
        raise ValueError('must use "/" between directories, not "\\"')
    if value.startswith("/"):
        raise ValueError("must be relative to the repository root, not an absolute path")
    if ".." in value.split("/"):
        raise ValueError('must stay inside the repository: ".." is not allowed')
    if value.startswith("-"):
        raise ValueError('must not start with "-"')
    return value


def _command(value: object) -> object:
    """One shell command; a YAML number, bool or mapping here is almost always a quoting slip.

    Validators raise ValueError throughout: pydantic reports it with the field's location,
    whereas a TypeError would escape validation as a crash.
    """
    if isinstance(value, dict):
        raise ValueError('must be a string, not a mapping: quote commands that contain ": "')
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {describe(value)}: put the command in quotes")
    if not value.strip():
        raise ValueError("is empty: remove it or write a command")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _env_name(name: str) -> str:
    """Names must be usable as shell variables, or the build could not read them."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"{quote(name)} is not a valid name: use letters, digits and _, "
            "not starting with a digit"
        )
    return name


def _env_value(value: object) -> str:
    """Scalars become the string the build sees; the value is never echoed, it may be a secret."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError("must not contain a NUL character")
        return value
    if value is None:
        raise ValueError('has no value: write "" for an empty string')
    raise ValueError(f"must be a string, number or true/false, not {describe(value)}")


def _step_name(name: str) -> str:
    """Names appear in the log and in ``depends_on``, so they are plain words."""
    if not _STEP_NAME_RE.fullmatch(name):
        raise ValueError(
            f"{quote(name)} is not a valid step name: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 63 characters"
        )
    return name


def _service_name(name: str) -> str:
    """The steps reach a service by its name, so the name must be a host name (a DNS label)."""
    if not _HOST_LABEL_RE.fullmatch(name):
        raise ValueError(
            f"{quote(name)} is not a valid service name: it is the host name the steps connect "
            "to, so use lowercase letters, digits and '-', starting and ending with a letter "
            "or digit, at most 63 characters"
        )
    return name


def _path_pattern(value: str) -> str:
    """Changed files are relative to the repository root: ``/src/**`` would never match one."""
    _one_line(value)
    if value.startswith("/"):
        raise ValueError(
            f'must be relative to the repository root, such as "src/**", not {quote(value)}'
        )
    return value


def _or(words: Iterable[str]) -> str:
    """``a, b or c``: how a message lists the choices."""
    words = list(words)
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _choice(value: object, allowed: tuple[str, ...]) -> str:
    """One of a few words; a near miss gets a suggestion, like an unknown field."""
    if isinstance(value, str) and value in allowed:
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be {_or(allowed)}, not {describe(value)}")
    close = difflib.get_close_matches(value, allowed, n=1)
    guess = f" (did you mean {close[0]}?)" if close else ""
    raise ValueError(f"must be {_or(allowed)}, not {quote(value)}{guess}")


def _event(value: object) -> str:
    return _choice(value, _EVENTS)


def _status(value: object) -> str:
    return _choice(value, _STATUSES)


def _failure(value: object) -> str:
    return _choice(value, ("fail", "ignore"))


def _listed(value: object, what: str) -> list[Any]:
    """One value where a list is expected is a list of one: ``branch: main``, ``event: push``."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f"must be {what} or a list of them, not {describe(value)}")
    return list(items)


def _command_list(value: object) -> object:
    """``script: make`` is the common case, so a single string is a one-command list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError("needs at least one command")
        return value
    raise ValueError(f"must be a command or a list of commands, not {describe(value)}")


def _optional_timeout(value: object) -> int | None:
    """People write durations; the executor wants seconds."""
    return None if value is None else _timeout_seconds(value)


_Text = Annotated[str, AfterValidator(_one_line)]
_Image = Annotated[str, AfterValidator(_image)]
_Workdir = Annotated[str, AfterValidator(_workdir)]
_RepoPath = Annotated[str, AfterValidator(_repo_path)]
_Command = Annotated[str, BeforeValidator(_command)]
_Env = dict[
    Annotated[str, AfterValidator(_env_name)],
    Annotated[str, BeforeValidator(_env_value)],
]
_SecretName = Annotated[str, AfterValidator(_env_name)]
_StepName = Annotated[str, AfterValidator(_step_name)]
_ServiceName = Annotated[str, AfterValidator(_service_name)]
_Pattern = Annotated[str, AfterValidator(_path_pattern)]
_Commands = Annotated[list[_Command] | None, BeforeValidator(_command_list)]
_Timeout = Annotated[int | None, BeforeValidator(_optional_timeout)]
_Event = Annotated[Literal["push", "tag", "merge_request"], BeforeValidator(_event)]
_Status = Annotated[Literal["success", "failure"], BeforeValidator(_status)]
_Failure = Annotated[Literal["fail", "ignore"], BeforeValidator(_failure)]


def _timeout_seconds(value: object) -> int:
    """Read ``600``, ``"600"``, ``"10m"`` or ``"1h30m"`` as seconds, within 1 s .. 24 h."""
    if isinstance(value, bool):
        raise ValueError(_BAD_TIMEOUT)
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value):
        seconds = int(value)
    elif isinstance(value, str) and value and (match := _DURATION_RE.fullmatch(value)):
        hours, minutes, secs = (int(group or 0) for group in match.groups())
        seconds = hours * 3600 + minutes * 60 + secs
    else:
        raise ValueError(_BAD_TIMEOUT)
    if not 1 <= seconds <= _MAX_TIMEOUT:
        raise ValueError(f'must be between 1 second and 24 hours ("24h"), not {value}')
    return seconds


#: A matrix expands every step once per combination: a few dozen builds' worth at most.
MAX_COMBINATIONS = 16
#: The deepest numbered checkout (beyond it, say ``full``).
MAX_DEPTH = 1_000_000
#: A step's name, with a matrix combination's label, is at most this long (its row's key).
MAX_STEP_NAME = 64
#: Directories one ``cache:`` keeps, and the length of its key.
MAX_CACHE_PATHS = 16
MAX_CACHE_KEY = 128


def combination_label(combination: dict[str, str]) -> str:
    """How a matrix combination is named in step names and statuses: ``GO=1.19, DB=mariadb``."""
    return ", ".join(f"{name}={value}" for name, value in combination.items())


# --- the models -----------------------------------------------------------------------------


class _Spec(BaseModel):
    """Frozen so a spec cannot change between stages; unknown fields are typos, so refuse them."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class BuildSpec(_Spec):
    """How to run the build: which container image, in which directory, which commands."""

    language: _Text | None = None
    image: _Image | None = None
    workdir: _Workdir = "/workspace"
    script: list[_Command] | None = None
    env: _Env = Field(default_factory=dict)
    timeout: int | None = None
    #: Names of project secret variables the script gets in its environment
    #: (their values live encrypted on the server, never in ci.yaml).
    secrets: list[Annotated[str, AfterValidator(_env_name)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _script_or_language(self) -> BuildSpec:
        """A known language brings a default script; without one, the script is required."""
        if self.script is None and self.language not in LANGUAGES:
            known = ", ".join(sorted(LANGUAGES))
            if self.language is None:
                raise ValueError(f"needs a script (or a language with a default script: {known})")
            raise ValueError(
                f"needs a script: language {self.language!r} has no default script "
                f"(languages with one: {known})"
            )
        return self

    @property
    def commands(self) -> list[str]:
        """The script to run: the one written, else the language's default."""
        if self.script is not None:
            return list(self.script)
        return list(LANGUAGES[self.language].script)

    @field_validator("script", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        """``script: make`` is the common case, so a single string is a one-command list."""
        return _command_list(value)

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> int | None:
        """People write durations; the executor wants seconds."""
        return None if value is None else _timeout_seconds(value)


class PublishSpec(_Spec):
    """How to build the image that is published once the build succeeds."""

    dockerfile: _RepoPath = "Dockerfile"
    context: _RepoPath = "."
    build_args: _Env = Field(default_factory=dict)
    #: ``true``: every build waits for a person's approval before publishing; a list of
    #: branch or tag name patterns (``main``, ``release/*``): only builds of those refs.
    approval: bool | list[_Text] = False

    @field_validator("approval", mode="before")
    @classmethod
    def _approval(cls, value: object) -> object:
        if isinstance(value, bool) or (
            isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
        ):
            return value
        raise ValueError(
            f"must be true, false or a list of branch patterns such as [main, 'release/*'], "
            f"not {describe(value)}"
        )

    def needs_approval(self, ref_name: str) -> bool:
        """Whether a build of ``ref_name`` waits for approval before it publishes."""
        if isinstance(self.approval, bool):
            return self.approval
        return any(fnmatch.fnmatchcase(ref_name, pattern) for pattern in self.approval)


@dataclass(frozen=True)
class StepContext:
    """What a step's ``when`` is decided on: the build's event and ref, and the run so far.

    ``branch`` is the pushed branch, or a merge request's source branch; None for a tag.
    ``changed_files`` are paths relative to the repository root, or None when the changes
    are unknown (the first push of a new branch, a tag). ``failed`` is true once a step
    that ran before this one has failed; a failure of a ``failure: ignore`` step does not
    count, since it does not fail the build.
    """

    event: str
    branch: str | None
    tag: str | None
    changed_files: tuple[str, ...] | None
    failed: bool

    def __post_init__(self) -> None:
        if self.event not in _EVENTS:
            raise ValueError(f"event must be {_or(_EVENTS)}, not {self.event!r}")

    def ref_text(self) -> str:
        """The ref being built, for a reason such as "... not to tag v1.0"."""
        if self.tag is not None:
            return f"tag {self.tag}"
        return "this build" if self.branch is None else f"branch {self.branch}"


def _matches_any(name: str, patterns: list[str]) -> bool:
    """Branch and tag patterns are fnmatch patterns, as in ``publish.approval``."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _path_matches_any(path: str, patterns: list[str]) -> bool:
    """Path patterns are globs in which ``**`` spans directories and ``*`` does not."""
    return bool(patterns) and wcglob.globmatch(path, patterns, flags=_PATH_FLAGS)


class PathFilter(_Spec):
    """Which changed files make a ``when.path`` condition hold.

    It holds when some changed file matches an ``include`` pattern (no ``include``: every
    file does) and no ``exclude`` pattern. ``*.md`` matches at the root only; ``**/*.md``
    in every directory.
    """

    include: list[_Pattern] | None = None
    exclude: list[_Pattern] = Field(default_factory=list)

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _patterns(cls, value: object) -> object:
        patterns = _listed(value, 'a pattern such as "src/**"')
        if not patterns:
            raise ValueError('needs at least one pattern such as "src/**"')
        return patterns

    @model_validator(mode="after")
    def _some_patterns(self) -> PathFilter:
        if self.include is None and not self.exclude:
            raise ValueError('needs include or exclude patterns, such as include: ["src/**"]')
        return self

    def mismatch(self, changed_files: tuple[str, ...]) -> str | None:
        """Why no changed file counts, or None when one does."""
        included = [
            path
            for path in changed_files
            if self.include is None or _path_matches_any(path, self.include)
        ]
        if any(not _path_matches_any(path, self.exclude) for path in included):
            return None
        excluded = ", ".join(self.exclude)
        if self.include is None:
            return f"every changed file is excluded ({excluded})" if included else "no file changed"
        if not included:
            return f"no changed file matches {', '.join(self.include)}"
        return f"every changed file that matches {', '.join(self.include)} is excluded ({excluded})"


#: How a message names what each ``when`` key takes.
_WHEN_VALUES = {
    "branch": 'a branch pattern such as "release/*"',
    "tag": 'a tag pattern such as "v*"',
    "event": "an event (push, tag or merge_request)",
    "status": "a status (success or failure)",
}


class WhenCondition(_Spec):
    """One condition of a step's ``when``: every key given must hold; a key left out does.

    ``status`` is what the run so far must be: ``success`` (the default: nothing before
    the step failed), ``failure``, or both for a step that always runs.
    """

    branch: list[_Text] | None = None
    tag: list[_Text] | None = None
    event: list[_Event] | None = None
    path: PathFilter | None = None
    status: list[_Status] = Field(default_factory=lambda: ["success"])

    @field_validator("branch", "tag", "event", "status", mode="before")
    @classmethod
    def _one_or_many(cls, value: object, info: ValidationInfo) -> object:
        what = _WHEN_VALUES[str(info.field_name)]
        values = _listed(value, what)
        if not values:
            raise ValueError(f"needs at least one value: {what}")
        return values

    @field_validator("path", mode="before")
    @classmethod
    def _path_shorthand(cls, value: object) -> object:
        """``path: src/**`` and ``path: [a/**, b/**]`` mean ``path: {include: [...]}``."""
        if isinstance(value, str | list | tuple):
            return {"include": value}
        if isinstance(value, dict | PathFilter):
            return value
        raise ValueError(
            'must be a pattern such as "src/**", a list of patterns or a mapping with '
            f"include and exclude, not {describe(value)}"
        )

    def mismatch(self, context: StepContext) -> str | None:
        """Why this condition does not hold in ``context``, or None when it does.

        A path condition holds when the changed files are unknown: builds of new branches
        and of tags run every step rather than skip one that may be needed.
        """
        if context.failed and "failure" not in self.status:
            return "an earlier step failed"
        if not context.failed and "success" not in self.status:
            return "runs only after a failure (when.status: failure)"
        if self.event is not None and context.event not in self.event:
            return f"when: event {context.event} is not {_or(self.event)}"
        if self.branch is not None:
            patterns = ", ".join(self.branch)
            if context.branch is None:
                return f"when: branch {patterns} is for branch builds, not {context.ref_text()}"
            if not _matches_any(context.branch, self.branch):
                return f"when: branch {context.branch} matches none of {patterns}"
        if self.tag is not None:
            patterns = ", ".join(self.tag)
            if context.tag is None:
                return f"when: tag {patterns} is for tag builds, not {context.ref_text()}"
            if not _matches_any(context.tag, self.tag):
                return f"when: tag {context.tag} matches none of {patterns}"
        if self.path is not None and context.changed_files is not None:
            reason = self.path.mismatch(context.changed_files)
            if reason is not None:
                return f"when: {reason}"
        return None


class StepSpec(_Spec):
    """One step of a ``steps:`` file: commands run in order by ``sh -e`` in a container."""

    name: _StepName
    image: _Image | None = None
    language: _Text | None = None
    commands: _Commands = None
    environment: _Env = Field(default_factory=dict)
    #: Names of project secret variables the commands get in their environment.
    secrets: list[_SecretName] = Field(default_factory=list)
    timeout: _Timeout = None
    #: Where the checkout is mounted in the container.
    workdir: _Workdir = "/workspace"
    #: Where in the checkout the commands run.
    directory: _RepoPath = "."
    #: Conditions, any one of which runs the step; None: run when nothing failed before it.
    when: list[WhenCondition] | None = None
    #: Steps this one waits for; once any step has depends_on, the steps form a graph.
    depends_on: list[_Text] | None = None
    #: ``ignore``: a failure of this step does not fail the build.
    failure: _Failure = "fail"

    @model_validator(mode="after")
    def _commands_or_language(self) -> StepSpec:
        """A known language brings a default script; without one, commands are required."""
        if self.commands is None and self.language not in LANGUAGES:
            known = ", ".join(sorted(LANGUAGES))
            if self.language is None:
                raise ValueError(f"needs commands (or a language with a default script: {known})")
            raise ValueError(
                f"needs commands: language {self.language!r} has no default script "
                f"(languages with one: {known})"
            )
        return self

    @field_validator("when", mode="before")
    @classmethod
    def _conditions(cls, value: object) -> object:
        """A single condition may be written without the list, as in Woodpecker."""
        if isinstance(value, dict | WhenCondition):
            return [value]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("needs at least one condition, or remove when:")
            return value
        raise ValueError(
            "must be a condition (a mapping such as {branch: main}) or a list of conditions, "
            f"not {describe(value)}"
        )

    @field_validator("depends_on", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        return _listed(value, "a step name")

    @field_validator("depends_on")
    @classmethod
    def _each_once(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            for i, name in enumerate(names):
                if name in names[:i]:
                    raise ValueError(f"names {quote(name)} twice: remove one")
        return names

    @property
    def commands_to_run(self) -> list[str]:
        """The commands written, else the language's default script."""
        if self.commands is not None:
            return list(self.commands)
        return list(LANGUAGES[self.language].script)

    def skip_reason(self, context: StepContext) -> str | None:
        """None when the step runs in ``context``, else why not: one line for the record.

        Conditions are alternatives (any one runs the step); without ``when`` a step runs
        only when nothing failed before it.
        """
        if self.when is None:
            return "an earlier step failed" if context.failed else None
        reasons = [condition.mismatch(context) for condition in self.when]
        if None in reasons:
            return None
        distinct = list(dict.fromkeys(str(reason) for reason in reasons))
        if len(distinct) == 1:
            return distinct[0]
        return (
            "when: no condition holds ("
            + "; ".join(reason.removeprefix("when: ") for reason in distinct)
            + ")"
        )


class ServiceSpec(_Spec):
    """A container started before the steps (a database, a cache), reached by its name."""

    name: _ServiceName
    image: _Image
    environment: _Env = Field(default_factory=dict)
    #: Run by ``sh -e`` instead of the image's own command; None: the image's command.
    commands: _Commands = None


@dataclass(frozen=True)
class _Problem:
    """A problem a validator finds somewhere below the value it checks, at ``loc`` in it.

    ``{at}`` in ``text`` becomes the line of ``ref`` (another place, such as the first use
    of a name); ``shown`` replaces the field path in the message.
    """

    loc: tuple[int | str, ...]
    text: str
    ref: tuple[int | str, ...] | None = None
    shown: tuple[str, ...] | None = None


class _Problems(ValueError):
    """Problems in several places at once; the parser gives each its own line number.

    Pydantic locates an error at the validator's field, but a duplicate name or a
    ``depends_on`` loop is at a step inside it: the parser reads ``problems`` instead.
    """

    def __init__(self, problems: list[_Problem]) -> None:
        self.problems = problems
        super().__init__(
            "; ".join(
                f"{_path_text(p.shown or p.loc)}: {p.text.replace('{at}', _path_text(p.ref or ()))}"
                for p in problems
            )
        )


def _path_text(loc: Iterable[int | str]) -> str:
    """``steps[0].when.branch``: a location as the messages write it."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _named_entries(value: object, what: str) -> object:
    """A mapping of name to spec is the list of specs, each named by its key, in file order."""
    if not isinstance(value, dict):
        return value
    entries: list[object] = []
    problems: list[_Problem] = []
    for key, spec in value.items():
        spec = {} if spec is None else spec
        if isinstance(spec, dict):
            if "name" in spec and spec["name"] != key:
                problems.append(
                    _Problem(
                        (str(key), "name"),
                        f"the key above names this {what} {quote(str(key))}: remove name: "
                        f"(or write the {what}s as a list)",
                    )
                )
            spec = {**spec, "name": key}
        entries.append(spec)
    if problems:
        raise _Problems(problems)
    return entries


def _name_problems(
    steps: list[tuple[str, tuple[int | str, ...]]], services: tuple[ServiceSpec, ...]
) -> list[_Problem]:
    """Steps and services are addressed by name (depends_on, host names): each name once.

    ``steps`` are the step names with where each is written.
    """
    problems: list[_Problem] = []
    step_at: dict[str, tuple[int | str, ...]] = {}
    for name, loc in steps:
        if name in step_at:
            text = f"step name '{name}' is used twice (first at {{at}})"
            problems.append(_Problem(loc, text, ref=step_at[name]))
        step_at.setdefault(name, loc)
    service_at: dict[str, tuple[int | str, ...]] = {}
    for i, service in enumerate(services):
        loc = ("services", i, "name")
        if service.name in service_at:
            text = f"service name '{service.name}' is used twice (first at {{at}})"
            problems.append(_Problem(loc, text, ref=service_at[service.name]))
        elif service.name in step_at:
            text = (
                f"service name '{service.name}' is also the name of the step at {{at}}: "
                "services and steps need different names, rename one of them"
            )
            problems.append(_Problem(loc, text, ref=step_at[service.name]))
        service_at.setdefault(service.name, loc)
    return problems


def _graph_problems(
    steps: tuple[StepSpec, ...], services: tuple[ServiceSpec, ...]
) -> list[_Problem]:
    """``depends_on`` must name other steps of the file and must not loop back."""
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        index.setdefault(step.name, i)
    service_names = {service.name for service in services}
    problems: list[_Problem] = []
    for i, step in enumerate(steps):
        for j, name in enumerate(step.depends_on or ()):
            loc = ("steps", i, "depends_on", j)
            if name == step.name:
                problems.append(_Problem(loc, f"a step cannot depend on itself: remove '{name}'"))
            elif name in service_names and name not in index:
                text = f"'{name}' is a service, not a step: services start before every step"
                problems.append(_Problem(loc, f"{text}, so remove it"))
            elif name not in index:
                close = difflib.get_close_matches(name, list(index), n=1)
                guess = f" (did you mean {close[0]}?)" if close else ""
                text = f"unknown step {quote(name)}{guess}; steps: {', '.join(index)}"
                problems.append(_Problem(loc, text))
    return problems + _cycle_problems(steps, index)


def _cycle_problems(steps: tuple[StepSpec, ...], index: dict[str, int]) -> list[_Problem]:
    """Each loop in ``depends_on`` once, in waiting order, from its first step in the file.

    An iterative depth-first search: a file may chain thousands of steps, deeper than
    Python's recursion limit.
    """
    waits_for = [
        [index[name] for name in step.depends_on or () if index.get(name, i) != i]
        for i, step in enumerate(steps)
    ]
    done: set[int] = set()
    found: set[tuple[int, ...]] = set()
    problems: list[_Problem] = []
    for start in range(len(steps)):
        if start in done:
            continue
        path, on_path = [start], {start}
        pending = [iter(waits_for[start])]
        while pending:
            target = next(pending[-1], None)
            if target is None:
                done.add(path[-1])
                on_path.discard(path.pop())
                pending.pop()
            elif target in on_path:
                cycle = path[path.index(target) :]
                first = cycle.index(min(cycle))
                cycle = cycle[first:] + cycle[:first]
                if tuple(cycle) not in found:
                    found.add(tuple(cycle))
                    names = [steps[i].name for i in [*cycle, cycle[0]]]
                    edge = (steps[cycle[0]].depends_on or []).index(names[1])
                    problems.append(
                        _Problem(
                            ("steps", cycle[0], "depends_on", edge),
                            f"a cycle: {' → '.join(names)}",
                            shown=("steps", "depends_on"),
                        )
                    )
            elif target not in done:
                path.append(target)
                on_path.add(target)
                pending.append(iter(waits_for[target]))
    return problems


class CloneSpec(_Spec):
    """How much history the checkout has: the pushed commit alone (``depth: 1``, the
    default), that many commits, or all of it (``depth: full``, from the agent's mirror)."""

    depth: int | Literal["full"] = 1

    @field_validator("depth", mode="before")
    @classmethod
    def _depth(cls, value: object) -> object:
        if value == "full" or (
            isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_DEPTH
        ):
            return value
        shown = value if isinstance(value, int) and not isinstance(value, bool) else None
        raise ValueError(f'must be "full" or a number of commits from 1 to {MAX_DEPTH}, '
                         f"not {shown if shown is not None else describe(value)}")  # fmt: skip


def _cache_path(value: str) -> str:
    """A directory of the checkout, written the one way it is stored (``./a/`` is ``a``)."""
    parts = [part for part in value.split("/") if part not in ("", ".")]
    if not parts:
        raise ValueError("must name a directory inside the repository, not the whole checkout")
    return "/".join(parts)


def _cache_key(value: str) -> str:
    if not value or len(value) > MAX_CACHE_KEY:
        raise ValueError(f"must be 1 to {MAX_CACHE_KEY} characters, not {len(value)}")
    return value


class CacheSpec(_Spec):
    """Directories of the checkout kept between builds of the project on each agent
    (dependencies, e.g. ``.m2/repository``): restored before the steps, saved after a
    successful build of a protected ref.

    ``key`` names the cache; by default it is the build's branch or tag, and a build
    whose key has no cache yet gets the one of the project's main branch. ``cache:
    false`` keeps nothing (not even a language default's cache).
    """

    paths: tuple[Annotated[_RepoPath, AfterValidator(_cache_path)], ...]
    key: Annotated[_Text, AfterValidator(_cache_key)] | None = None

    @field_validator("paths", mode="before")
    @classmethod
    def _path_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not value:
            found = "an empty list" if isinstance(value, list | tuple) else describe(value)
            raise ValueError("must list one or more directories of the repository, such as "
                             f"[.m2/repository] (false keeps nothing), not {found}")  # fmt: skip
        if len(value) > MAX_CACHE_PATHS:
            raise ValueError(f"lists {len(value)} directories; at most {MAX_CACHE_PATHS}")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> CacheSpec:
        """One directory inside another would be stored twice."""
        for path in self.paths:
            for other in self.paths:
                if path != other and other.startswith(path + "/"):
                    raise ValueError(f"{quote(other)} is inside {quote(path)}: list it once")
        if len(set(self.paths)) != len(self.paths):
            raise ValueError("paths lists a directory twice")
        return self

    @property
    def enabled(self) -> bool:
        """False for ``cache: false``."""
        return bool(self.paths)


#: ``cache: false``: nothing is kept, not even a language default's directories.
NO_CACHE = CacheSpec.model_construct(paths=(), key=None)


class Pipeline(_Spec):
    """A whole ``ci.yaml``: a build or steps, services beside them, an image to publish.

    ``build:`` is the original one-script format and stays as it was; ``steps:`` is the
    general one. A file has exactly one of them; :attr:`steps_to_run` reads either.
    """

    build: BuildSpec | None = None
    steps: tuple[StepSpec, ...] | None = None
    services: tuple[ServiceSpec, ...] = ()
    clone: CloneSpec = Field(default_factory=CloneSpec)
    #: What is kept between builds; None: the language default's, if any (Java: Maven's).
    cache: CacheSpec | None = None
    #: Axes (a variable name each) and their values: the steps run once per combination.
    matrix: dict[Annotated[str, AfterValidator(_env_name)], list[Annotated[str, BeforeValidator(
        _env_value)]]] | None = None  # fmt: skip
    publish: PublishSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _build_or_steps(cls, data: object) -> object:
        """Two formats in one file would leave it unclear which one runs: refuse the second."""
        if isinstance(data, dict) and "build" in data and "steps" in data:
            second = [key for key in data if key in ("build", "steps")][1]
            text = "use either build: (one script) or steps: (several), not both"
            raise _Problems([_Problem((second,), text)])
        return data

    @field_validator("build", mode="before")
    @classmethod
    def _build_given(cls, value: object) -> object:
        """``build:`` with nothing under it is a mistake, not "no build"."""
        if value is None:
            fields = ", ".join(BuildSpec.model_fields)
            raise ValueError(f"must be a mapping with the fields {fields}, not {describe(value)}")
        return value

    @field_validator("steps", mode="before")
    @classmethod
    def _step_list(cls, value: object) -> object:
        """A list of steps, each with a name, or a mapping of step name to step."""
        if isinstance(value, list | tuple | dict):
            if not value:
                raise ValueError("needs at least one step")
            return _named_entries(value, "step")
        raise ValueError(
            "must be a list of steps (mappings with a name) or a mapping of step name to step, "
            f"not {describe(value)}"
        )

    @field_validator("services", mode="before")
    @classmethod
    def _service_list(cls, value: object) -> object:
        """A list of services, each with a name, or a mapping of service name to service."""
        if value is None:
            return ()
        if isinstance(value, list | tuple | dict):
            return _named_entries(value, "service")
        raise ValueError(
            "must be a list of services (mappings with a name) or a mapping of service name "
            f"to service, not {describe(value)}"
        )

    @field_validator("matrix", mode="before")
    @classmethod
    def _axes(cls, value: object) -> object:
        """A mapping of axis name to a list of its values, a few combinations at most."""
        if value is None:
            return None
        if not isinstance(value, dict) or not value:
            example = "{GO_VERSION: ['1.19', '1.21']}"
            raise ValueError("must be a mapping of variable names to lists of values, such "
                             f"as {example}, not {describe(value)}")  # fmt: skip
        combinations = 1
        for name, values in value.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{quote(str(name))} must be a list of one or more values, "
                                 f"not {describe(values)}")  # fmt: skip
            if len(set(map(str, values))) != len(values):
                raise ValueError(f"{quote(str(name))} lists a value twice")
            combinations *= len(values)
        if combinations > MAX_COMBINATIONS:
            raise ValueError(f"makes {combinations} combinations; at most {MAX_COMBINATIONS}")
        return value

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_shorthand(cls, value: object) -> object:
        """``cache: [dirs]`` is ``{paths: [dirs]}``; ``false`` keeps nothing."""
        if value is False:
            return NO_CACHE
        if isinstance(value, list | str):
            return {"paths": value}
        if isinstance(value, dict | CacheSpec):
            return value
        raise ValueError("must be a list of directories, a mapping {paths, key} or false, "
                         f"not {describe(value)}")  # fmt: skip

    @field_validator("publish", mode="before")
    @classmethod
    def _publish_shorthand(cls, value: object) -> object:
        """``publish: true`` means "with the defaults"; false or nothing means "do not publish"."""
        if value is True:
            return {}
        if value is None or value is False:
            return None
        if isinstance(value, dict | PublishSpec):
            return value
        raise ValueError(
            "must be true, false or a mapping (dockerfile, context, build_args), "
            f"not {describe(value)}"
        )

    @model_validator(mode="after")
    def _runnable(self) -> Pipeline:
        """Something to run, names that identify one step or service, and no waiting loop."""
        if self.build is None and self.steps is None:
            raise ValueError(
                "needs a build section (one script) or a steps section (several); "
                f"for example:\n{_EXAMPLE}\n{_STEPS_EXAMPLE}"
            )
        steps = self.steps or ()
        names: list[tuple[str, tuple[int | str, ...]]] = [
            (step.name, ("steps", i, "name")) for i, step in enumerate(steps)
        ]
        if self.steps is None:
            names = [("build", ("build",))]  # the one step of a build: file
        problems = _name_problems(names, self.services)
        problems += _graph_problems(steps, self.services)
        if problems:
            raise _Problems(problems)
        longest = max((len(step.name) for step in self.steps_to_run), default=0)
        if self.matrix and longest > MAX_STEP_NAME:
            raise ValueError(
                f"matrix: its values make step names of {longest} characters (step "
                f"[axis=value, …]); at most {MAX_STEP_NAME}: use shorter step names or values"
            )
        return self

    @property
    def combinations(self) -> tuple[dict[str, str], ...]:
        """The matrix's combinations of axis values, first axis slowest; one empty one
        without a matrix."""
        if not self.matrix:
            return ({},)
        names = list(self.matrix)
        return tuple(dict(zip(names, values, strict=True))
                     for values in itertools.product(*self.matrix.values()))  # fmt: skip

    @property
    def steps_to_run(self) -> tuple[StepSpec, ...]:
        """The steps in file order (with a matrix: each combination's, one after the other,
        named ``step [AXIS=value, …]`` and with the axis values in their environment); a
        ``build:`` file is one step named ``build``."""
        steps = self._written_steps
        if not self.matrix:
            return steps
        expanded = []
        for combination in self.combinations:
            label = combination_label(combination)
            for step in steps:
                fields = {
                    "name": f"{step.name} [{label}]",
                    "environment": {**step.environment, **combination},
                }
                if step.depends_on is not None:
                    fields["depends_on"] = [f"{name} [{label}]" for name in step.depends_on]
                expanded.append(step.model_copy(update=fields))
        return tuple(expanded)

    def combination_of(self, step_name: str) -> str | None:
        """The label of the matrix combination a step of :attr:`steps_to_run` belongs to."""
        if not self.matrix or not step_name.endswith("]") or " [" not in step_name:
            return None
        return step_name[step_name.rindex(" [") + 2 : -1]

    @property
    def _written_steps(self) -> tuple[StepSpec, ...]:
        if self.steps is not None:
            return self.steps
        if self.build is None:
            return ()
        build = self.build
        fields: dict[str, Any] = {
            "name": "build",
            "image": build.image,
            "language": build.language,
            "workdir": build.workdir,
            "environment": build.env,
            "timeout": build.timeout,
            "secrets": build.secrets,
        }
        if build.script is not None:
            fields["commands"] = build.script
        return (StepSpec.model_validate(fields),)

    @property
    def dependencies(self) -> dict[str, tuple[str, ...]]:
        """The names each step waits for, by step name.

        Without any ``depends_on`` the steps run one after another in file order. Once a
        step has ``depends_on`` (even ``[]``), the file is a graph: each step waits for
        exactly its own ``depends_on``, and a step without one starts at once.
        """
        steps = self.steps_to_run
        if all(step.depends_on is None for step in steps):  # in file order, per combination
            return {
                step.name: (steps[i - 1].name,)
                if i and self.combination_of(steps[i - 1].name) == self.combination_of(step.name)
                else ()
                for i, step in enumerate(steps)
            }
        return {step.name: tuple(step.depends_on or ()) for step in steps}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data, for storing the spec with the build or showing it in the API.

        Sections the file does not use (``build`` or ``steps``, no ``services``) are left
        out, so a ``build:`` file gives the same data as before ``steps:`` existed.
        """
        unused = {
            name for name in ("build", "steps", "matrix", "cache") if getattr(self, name) is None
        }
        if self.clone == CloneSpec():
            unused.add("clone")
        if not self.services:
            unused.add("services")
        return self.model_dump(mode="json", exclude=unused)


#: Which model a validation error's location points into, to list its allowed fields;
#: ``*`` stands for any list index.
_MODELS: dict[tuple[str, ...], type[_Spec]] = {
    (): Pipeline,
    ("build",): BuildSpec,
    ("publish",): PublishSpec,
    ("steps", "*"): StepSpec,
    ("services", "*"): ServiceSpec,
    ("clone",): CloneSpec,
    ("cache",): CacheSpec,
    ("steps", "*", "when", "*"): WhenCondition,
    ("steps", "*", "when", "*", "path"): PathFilter,
}


# --- parsing --------------------------------------------------------------------------------


def parse_pipeline(text: str | bytes, filename: str = CI_FILENAME) -> Pipeline:
    """Parse and validate ``ci.yaml`` content; every problem raises one :class:`PipelineError`.

    ``filename`` only prefixes the messages, so they read ``ci.yaml line 5: build.timeout: ...``.
    """
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CI_YAML_BYTES:
        raise PipelineError(
            f"{filename} is too big ({size} bytes; the limit is {MAX_CI_YAML_BYTES}): "
            "move long scripts into a file in the repository and run that file"
        )
    if isinstance(text, bytes):
        text = yamldoc.decode(text, filename)

    composed = yamldoc.compose(text, filename, verbatim=_VERBATIM)
    if composed is None:
        raise PipelineError(f"{filename} is empty: {_top_level_hint('')}")
    root, data = composed
    if not isinstance(data, dict):
        raise PipelineError(
            f"{filename} line {root.start_mark.line + 1}: "
            + _top_level_hint(f", not {describe(data)}")
        )
    try:
        return Pipeline.model_validate(data)
    except ValidationError as exc:
        raise PipelineError(_validation_message(exc, root, data, filename)) from None


def load_pipeline(checkout: Path) -> Pipeline:
    """Read and parse ``ci.yaml`` at the root of ``checkout``, the clone of the pushed commit.

    The repository's content is untrusted: ``ci.yaml`` may be a symlink, and one
    that leads outside the checkout (``/etc/passwd``, a secret on the worker)
    must not be read and echoed back in an error message.
    """
    root = Path(checkout).resolve()
    names = os.listdir(root)
    if CI_FILENAME not in names:  # an exact name, even on a case-insensitive file system
        near = [n for n in names if n.lower() in ("ci.yaml", "ci.yml", ".ci.yaml", ".ci.yml")]
        hint = f" (found {near[0]}: rename it to {CI_FILENAME})" if near else ""
        raise PipelineError(
            f"no {CI_FILENAME} at the repository root{hint}: add one, e.g.\n{_EXAMPLE}"
        )
    target = (root / CI_FILENAME).resolve()
    if not target.is_relative_to(root):
        raise PipelineError(
            f"{CI_FILENAME} is a symlink that points outside the repository: "
            "commit it as a regular file"
        )
    if not target.is_file():
        raise PipelineError(f"{CI_FILENAME} at the repository root is not a regular file")
    try:
        with target.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > MAX_CI_YAML_BYTES:
                raise PipelineError(
                    f"{CI_FILENAME} is too big ({size} bytes; the limit is {MAX_CI_YAML_BYTES}): "
                    "move long scripts into a file in the repository and run that file"
                )
            raw = fh.read(MAX_CI_YAML_BYTES + 1)  # the file could grow after fstat
    except OSError as exc:
        raise PipelineError(f"cannot read {CI_FILENAME}: {exc.strerror}") from exc
    return parse_pipeline(raw, CI_FILENAME)


def _top_level_hint(found: str) -> str:
    return (
        f"the top level must be a mapping with a build section{found}; for example:\n"
        f"{_EXAMPLE}\n{_STEPS_EXAMPLE}"
    )


def _validation_message(
    exc: ValidationError, root: Node, data: dict[str, Any], filename: str
) -> str:
    """One line per problem, in file order, so they can be fixed top to bottom in one push."""
    problems: list[tuple[int, str]] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = error.get("ctx", {}).get("error")
        if not isinstance(cause, _Problems):
            problems.append(_problem_line(root, data, filename, loc, _problem_text(error, loc)))
            continue
        for problem in cause.problems:
            text = problem.text
            if problem.ref is not None:
                ref_path, ref_line = _locate(root, data, loc + problem.ref)
                text = text.replace(
                    "{at}", f"line {ref_line}" if ref_line else _path_text(ref_path)
                )
            problems.append(
                _problem_line(root, data, filename, loc + problem.loc, text, problem.shown)
            )
    problems.sort(key=lambda problem: problem[0])
    lines = [text for _, text in problems]
    if len(lines) == 1:
        return lines[0]
    shown = [f"  {text}" for text in lines[:_MAX_PROBLEMS]]
    if len(lines) > _MAX_PROBLEMS:
        shown.append(f"  ... and {len(lines) - _MAX_PROBLEMS} more")
    return "\n".join([f"{filename} is invalid ({len(lines)} problems):", *shown])


def _problem_line(
    root: Node,
    data: dict[str, Any],
    filename: str,
    loc: tuple[int | str, ...],
    text: str,
    shown: tuple[str, ...] | None = None,
) -> tuple[int, str]:
    """``ci.yaml line 5: build.timeout: text``, and the line to sort by."""
    path_loc, line = _locate(root, data, loc)
    where = filename if line is None else f"{filename} line {line}"
    path = _path_text(path_loc if shown is None else shown)
    return line or 0, f"{where}: {path}: {text}" if path else f"{where}: {text}"


def _locate(
    root: Node, data: dict[str, Any], loc: tuple[int | str, ...]
) -> tuple[tuple[int | str, ...], int | None]:
    """The path of a validation location as the pusher wrote it, and its line.

    ``steps:`` and ``services:`` written as a mapping are validated as a list, so an index
    there becomes the entry's key; the name of such an entry is that key, so a problem with
    the name is shown at the key, and the message names it (like a bad ``env`` name).
    """
    section = data.get(loc[0]) if loc and isinstance(loc[0], str) else None
    if isinstance(section, dict) and len(loc) >= 2 and isinstance(loc[1], int):
        keys = list(section)
        if loc[1] < len(keys):
            rest = ("[key]",) if loc[2:] == ("name",) else loc[2:]
            loc = (loc[0], str(keys[loc[1]]), *rest)
    written, line = yamldoc.locate(root, loc)
    if written[-1:] == ("[key]",):
        written = written[:-2]  # the name is in the message
    return written, line


def _model_at(loc: tuple[int | str, ...]) -> type[_Spec] | None:
    return _MODELS.get(tuple("*" if isinstance(part, int) else part for part in loc))


def _problem_text(error: Any, loc: tuple[int | str, ...]) -> str:
    """Pydantic's wording speaks of Python types; say it in the terms of the YAML file."""
    kind = error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "missing":
        return "this field is required"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown field{guess}; allowed fields: {', '.join(allowed)}"
    if kind in ("model_type", "model_attributes_type") and (model := _model_at(loc)):
        fields = ", ".join(model.model_fields)
        return f"must be a mapping with the fields {fields}, not {describe(error['input'])}"
    if kind == "dict_type":
        return f"must be a mapping such as NAME: value, not {describe(error['input'])}"
    if kind == "string_type":
        return f"must be a string, not {describe(error['input'])}"
    return str(error["msg"])
