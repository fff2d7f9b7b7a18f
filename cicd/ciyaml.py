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
import os
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yaml.nodes import Node

from cicd import yamldoc
from cicd.errors import PipelineError
from cicd.languages import LANGUAGES
from cicd.yamldoc import describe, quote

__all__ = [
    "CI_FILENAME",
    "MAX_CI_YAML_BYTES",
    "BuildSpec",
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
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DURATION_RE = re.compile(r"(?:([0-9]{1,9})h)?(?:([0-9]{1,9})m)?(?:([0-9]{1,9})s)?")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SPACE_OR_CONTROL_RE = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
#: Mappings whose values are environment text: ``3.10`` stays "3.10", ``010`` is not 8.
_VERBATIM = (("build", "env"), ("publish", "build_args"))
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


_Text = Annotated[str, AfterValidator(_one_line)]
_Image = Annotated[str, AfterValidator(_image)]
_Workdir = Annotated[str, AfterValidator(_workdir)]
_RepoPath = Annotated[str, AfterValidator(_repo_path)]
_Command = Annotated[str, BeforeValidator(_command)]
_Env = dict[
    Annotated[str, AfterValidator(_env_name)],
    Annotated[str, BeforeValidator(_env_value)],
]


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
        if value is None:
            raise ValueError(f"must be a command or a list of commands, not {describe(value)}")
        if isinstance(value, str):
            return [value]
        if isinstance(value, list | tuple):
            if not value:
                raise ValueError("needs at least one command")
            return value
        raise ValueError(f"must be a command or a list of commands, not {describe(value)}")

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


class Pipeline(_Spec):
    """A whole ``ci.yaml``: the build, and optionally the image to publish after it."""

    build: BuildSpec
    publish: PublishSpec | None = None

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data, for storing the spec with the build or showing it in the API."""
        return self.model_dump(mode="json")


#: Which model a validation error's location points into, to list its allowed fields.
_MODELS: dict[tuple[str, ...], type[_Spec]] = {
    (): Pipeline,
    ("build",): BuildSpec,
    ("publish",): PublishSpec,
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
        raise PipelineError(_validation_message(exc, root, filename)) from None


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
    return f"the top level must be a mapping with a build section{found}; for example:\n{_EXAMPLE}"


def _validation_message(exc: ValidationError, root: Node, filename: str) -> str:
    """One line per problem, in file order, so they can be fixed top to bottom in one push."""
    problems: list[tuple[int, str]] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        path_loc = loc[:-2] if loc[-1:] == ("[key]",) else loc  # the name is in the message
        line = yamldoc.line_of(root, loc)
        where = filename if line is None else f"{filename} line {line}"
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path_loc).lstrip(".")
        text = _problem_text(error, loc)
        problems.append((line or 0, f"{where}: {path}: {text}" if path else f"{where}: {text}"))
    problems.sort(key=lambda problem: problem[0])
    lines = [text for _, text in problems]
    if len(lines) == 1:
        return lines[0]
    shown = [f"  {text}" for text in lines[:_MAX_PROBLEMS]]
    if len(lines) > _MAX_PROBLEMS:
        shown.append(f"  ... and {len(lines) - _MAX_PROBLEMS} more")
    return "\n".join([f"{filename} is invalid ({len(lines)} problems):", *shown])


def _problem_text(error: Any, loc: tuple[int | str, ...]) -> str:
    """Pydantic's wording speaks of Python types; say it in the terms of the YAML file."""
    kind = error["type"]
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "missing":
        return "this field is required"
    if kind == "extra_forbidden":
        allowed = list(_MODELS[tuple(loc[:-1])].model_fields) if loc[:-1] in _MODELS else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown field{guess}; allowed fields: {', '.join(allowed)}"
    if kind in ("model_type", "model_attributes_type") and loc in _MODELS:
        fields = ", ".join(_MODELS[loc].model_fields)
        return f"must be a mapping with the fields {fields}, not {describe(error['input'])}"
    if kind == "dict_type":
        return f"must be a mapping such as NAME: value, not {describe(error['input'])}"
    if kind == "string_type":
        return f"must be a string, not {describe(error['input'])}"
    return str(error["msg"])
