"""``ci.yaml`` as YAML: a composed node tree that keeps line numbers, read safely.

The spec (:mod:`cicd.ciyaml`) validates plain data; this module gets that data
out of untrusted text and points back into the file: PyYAML's safe loader (no
Python objects), the tree composed first so that alias bombs, self-containing
aliases and duplicate keys are refused before anything is expanded, and the
line of any field path (:func:`line_of`) for the spec's error messages. Every
problem is a :class:`~cicd.errors.PipelineError` naming the file and the line.
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cicd.errors import PipelineError

__all__ = ["MAX_NODES", "compose", "decode", "describe", "line_of", "locate", "quote"]

#: Nodes visited while following aliases; a real ci.yaml has a few dozen.
MAX_NODES = 10_000

_TAG = "tag:yaml.org,2002:"
_STR_TAG = _TAG + "str"
_MERGE_TAG = _TAG + "merge"
_NUMBER_TAGS = {_TAG + "int", _TAG + "float"}
#: Implicit types a plain mapping key could resolve to; keys are names, so they stay strings
#: (YAML 1.1 would read ``ON:`` as True and ``1:`` as an int).
_KEY_TAGS = {_TAG + t for t in ("bool", "int", "float", "null", "timestamp")}


def compose(
    text: str, filename: str, verbatim: tuple[tuple[str, ...], ...] = ()
) -> tuple[Node, Any] | None:
    """The document's root node and its data, or None for an empty document.

    Mappings (or lists) at the ``verbatim`` key paths keep plain numbers as written text
    (``3.10`` stays "3.10"): they are environment values, not numbers. A ``*`` in a
    path stands for every item of a list or every value of a mapping, as in
    ``("steps", "*", "environment")`` for steps written either way.
    """
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character up front: may raise ReaderError
        root = loader.get_single_node()
        if root is None:
            return None
        _check_tree(root, filename)
        for path in verbatim:
            _keep_verbatim(root, path)
        return root, loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise PipelineError(_yaml_error_message(exc, filename)) from exc
    except yaml.reader.ReaderError as exc:
        line, column = _line_column(text, exc.position)
        raise PipelineError(
            f"{filename} line {line}, column {column}: character U+{exc.character:04X} "
            "is not allowed in YAML: remove it"
        ) from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"{filename}: YAML error: {exc}") from exc
    except RecursionError:
        raise PipelineError(f"{filename}: the YAML is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def quote(text: str) -> str:
    """Quote user text for a message: escapes control characters, shortens long values."""
    if len(text) > 60:
        text = text[:57] + "..."
    return json.dumps(text, ensure_ascii=False)


def describe(value: object) -> str:
    """Name a YAML value's type the way the person who wrote it thinks of it."""
    if value is None:
        return "null (nothing)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def decode(raw: bytes, filename: str) -> str:
    """ci.yaml is UTF-8; say where it is not, since editors rarely show the bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PipelineError(
            f"{filename} line {line}: the file is not valid UTF-8 "
            f"(byte 0x{raw[exc.start]:02x}): save it as UTF-8"
        ) from exc


def _line_column(text: str, position: int) -> tuple[int, int]:
    return text.count("\n", 0, position) + 1, position - (text.rfind("\n", 0, position) + 1) + 1


def _yaml_error_message(exc: yaml.MarkedYAMLError, filename: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = (
        filename if mark is None else f"{filename} line {mark.line + 1}, column {mark.column + 1}"
    )
    label = (
        "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    )
    problem = exc.problem or exc.context or "invalid YAML"
    if exc.context and problem.startswith("but "):  # "but found another document" needs its start
        problem = f"{exc.context}, {problem}"
    if "'\\t'" in problem:
        problem += " (indent with spaces, not tabs)"
    return f"{where}: {label}: {problem}"


def _check_tree(root: Node, filename: str) -> None:
    """Walk the composed tree as the constructor would, aliases included, before building data.

    Refuses documents that expand past :data:`MAX_NODES` ("billion laughs"), aliases that
    contain themselves, and duplicate keys (YAML would silently keep the last one). Plain
    scalar keys are read as strings and plain timestamps as text: no field wants a date.
    """
    count = 0
    open_nodes: set[int] = set()  # the collections on the path from the root: a cycle check
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            open_nodes.discard(id(node))
            continue
        if id(node) in open_nodes:
            raise PipelineError(
                f"{filename} line {node.start_mark.line + 1}: this anchored mapping or list "
                "contains an alias to itself: remove the loop"
            )
        count += 1
        if count > MAX_NODES:
            raise PipelineError(
                f"{filename}: the YAML expands to more than {MAX_NODES} values "
                "through anchors and aliases: simplify it"
            )
        if isinstance(node, ScalarNode):
            if node.tag == _TAG + "timestamp" and node.style is None:
                node.tag = _STR_TAG
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        if isinstance(node, MappingNode):
            _check_keys(node, filename)
            children = [child for pair in node.value for child in pair]
        else:
            children = list(node.value)
        stack.extend((child, False) for child in reversed(children))


def _check_keys(node: MappingNode, filename: str) -> None:
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == _MERGE_TAG:
            continue
        if key.style is None and key.tag in _KEY_TAGS:
            key.tag = _STR_TAG
        line = key.start_mark.line + 1
        if key.tag == _STR_TAG and key.value in seen:
            raise PipelineError(
                f"{filename} line {line}: duplicate key {quote(key.value)}, "
                f"already set on line {seen[key.value]}: remove one of them"
            )
        seen[key.value] = line


def _keep_verbatim(node: Node, path: tuple[str, ...]) -> None:
    if not path:
        if isinstance(node, MappingNode):
            _plain_numbers_as_text(node)
        elif isinstance(node, SequenceNode):  # a list of values (a matrix axis)
            for item in node.value:
                if isinstance(item, ScalarNode) and item.style is None and item.tag in _NUMBER_TAGS:
                    item.tag = _STR_TAG
        return
    name, rest = path[0], path[1:]
    if name == "*":
        for child in _children(node):
            _keep_verbatim(child, rest)
    elif isinstance(node, MappingNode) and (found := _find_key(node, name)):
        _keep_verbatim(found[1], rest)


def _children(node: Node) -> list[Node]:
    """A list's items or a mapping's values, looking through ``<<`` merges."""
    if isinstance(node, SequenceNode):
        return list(node.value)
    if not isinstance(node, MappingNode):
        return []
    children: list[Node] = []
    for key, value in node.value:
        if key.tag != _MERGE_TAG:
            children.append(value)
            continue
        for mapping in value.value if isinstance(value, SequenceNode) else [value]:
            children.extend(_children(mapping) if isinstance(mapping, MappingNode) else [])
    return children


def _plain_numbers_as_text(node: MappingNode) -> None:
    for key, value in node.value:
        if key.tag == _MERGE_TAG:
            merged = value.value if isinstance(value, SequenceNode) else [value]
            for mapping in merged:
                if isinstance(mapping, MappingNode):
                    _plain_numbers_as_text(mapping)
        elif isinstance(value, ScalarNode) and value.style is None and value.tag in _NUMBER_TAGS:
            value.tag = _STR_TAG


def _find_key(node: MappingNode, name: str) -> tuple[Node, Node] | None:
    """The (key, value) nodes for ``name``, looking through ``<<`` merges as PyYAML does."""
    for key, value in node.value:
        if isinstance(key, ScalarNode) and key.tag == _STR_TAG and key.value == name:
            return key, value
    for key, value in node.value:
        if key.tag == _MERGE_TAG:
            merged = value.value if isinstance(value, SequenceNode) else [value]
            for mapping in merged:
                found = _find_key(mapping, name) if isinstance(mapping, MappingNode) else None
                if found:
                    return found
    return None


def line_of(root: Node, loc: tuple[int | str, ...]) -> int | None:
    """The line of the deepest key or list item of ``loc`` present in the file, if any."""
    return locate(root, loc)[1]


def locate(root: Node, loc: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], int | None]:
    """``loc`` as written in the file, and the line of its deepest part present there.

    The spec reads shorthands as their long form: one value where it takes a list
    (``commands: make``, ``when: {...}``) as a list of one, and a pattern or a list where
    it takes a mapping (``path: src/**`` as ``{include: [src/**]}``). So a list index that
    lands on a scalar or a mapping, and a key that lands on a scalar or a list, are
    dropped: the message then names the field as the pusher wrote it. A key under an
    empty value is kept (``db:`` with nothing is read as an empty mapping), and so is
    ``[key]``, pydantic's mark for a problem with a mapping's key itself.
    """
    node: Node | None = root
    line: int | None = None
    written: list[int | str] = []
    for part in loc:
        if isinstance(part, int) and isinstance(node, ScalarNode | MappingNode):
            continue  # a single value read as a list of one
        if isinstance(part, str) and part != "[key]" and _is_shorthand(node):
            continue  # a shorthand read as a mapping
        written.append(part)
        if isinstance(node, MappingNode) and isinstance(part, str):
            found = _find_key(node, part)
            node = found[1] if found else None
            line = found[0].start_mark.line + 1 if found else line
        elif isinstance(node, SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            node = None
    return tuple(written), line


def _is_shorthand(node: Node | None) -> bool:
    """A list or a non-empty scalar, where the spec reads a mapping."""
    if isinstance(node, SequenceNode):
        return True
    return isinstance(node, ScalarNode) and node.tag != _TAG + "null"
