"""Image names are one-to-one: no two refs of a project, and no two projects, share one.

Property tests over the names git and GitLab allow (checked by the same
validators the webhook uses), against the OCI distribution grammar.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cicd import projects
from cicd.errors import PayloadError
from cicd.forges import PROJECT_PATH, validate_ref_name
from workers.registry import escape_ref, image_reference

#: https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests
TAG = re.compile(r"\A[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}\Z")
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
REPOSITORY = re.compile(rf"\A{COMPONENT}(?:/{COMPONENT})*\Z")
SHA = "1234abcd" + "0" * 32

ref_names = st.text(st.sampled_from("abcXYZ019-._/@{~^:+é€ "), min_size=1, max_size=300).filter(
    lambda name: _valid(name)
)


def _valid(name: str) -> bool:
    try:
        validate_ref_name(name)
    except PayloadError:
        return False
    return True


@settings(max_examples=600)
@given(one=st.tuples(st.sampled_from(["branch", "tag"]), ref_names),
       two=st.tuples(st.sampled_from(["branch", "tag"]), ref_names))  # fmt: skip
def test_distinct_refs_get_distinct_valid_image_tags(one, two):
    first = image_reference("r.example/team", "group/app", *one, SHA)[1]
    second = image_reference("r.example/team", "group/app", *two, SHA)[1]
    assert TAG.match(first), first
    assert (first == second) == (one == two), (one, two, first)


@pytest.mark.parametrize(("ref_type", "name", "tag"), [
    ("branch", "main", "main..1234abcd"),
    ("branch", "feature/login", "feature__login..1234abcd"),
    ("tag", "v1.2.0", "v1.2.0"),
    ("tag", "main-1234abcd", "main-1234abcd"),  # 0.1's name for branch main at 1234abcd
    ("tag", "v1/x", "v1__x"),
    ("tag", "v1-x", "v1-x"),
    ("tag", "a_b", "a_5fb"),
])  # fmt: skip
def test_the_readme_examples(ref_type, name, tag):
    assert image_reference("r", "group/app", ref_type, name, SHA)[1] == tag
    assert escape_ref(name) == tag.removesuffix("..1234abcd")


segments = st.from_regex(r"\A[A-Za-z0-9]{1,3}(?:(?:[._]|__|-{1,2})[A-Za-z0-9]{1,3}){0,2}\Z")


@settings(max_examples=300)
@given(st.lists(segments, min_size=1, max_size=4), st.lists(segments, min_size=1, max_size=4))
def test_projects_map_to_valid_repositories_one_to_one_without_case(one, two):
    first, second = "/".join(one), "/".join(two)
    assert PROJECT_PATH.match(first) and projects.PATH.match(first)
    repo_one = image_reference("r", first, "tag", "v1", SHA)[0].removeprefix("r/")
    repo_two = image_reference("r", second, "tag", "v1", SHA)[0].removeprefix("r/")
    assert REPOSITORY.match(repo_one), repo_one
    assert (repo_one == repo_two) == (first.lower() == second.lower())


def test_paths_0_1_made_equal_are_distinct():
    """0.1 mapped a/b--c and a/b-c to one repository."""
    assert image_reference("r", "a/b--c", "tag", "v", SHA) != image_reference(
        "r", "a/b-c", "tag", "v", SHA
    )


@pytest.mark.parametrize(("url", "registered", "same"), [
    ("http://git.example/g/app.git", "http://git.example/g/app.git", True),
    ("HTTP://Git.Example:80/g/app/", "http://git.example/g/app.git", True),
    ("https://git.example:443/g/app", "https://git.example/g/app.git", True),
    ("http://git.example/g/app.git", "https://git.example/g/app.git", False),
    ("http://git.example:8080/g/app.git", "http://git.example/g/app.git", False),
    ("http://evil.example/g/app.git", "http://git.example/g/app.git", False),
    ("http://git.example/g/other.git", "http://git.example/g/app.git", False),
    ("http://git.example/G/app.git", "http://git.example/g/app.git", False),
])  # fmt: skip
def test_clone_urls_compare_as_repositories(url, registered, same):
    assert projects.same_url(url, registered) is same


@pytest.mark.parametrize(("stored", "ref_type", "name", "matched"), [
    ("main", "branch", "main", True),
    ("main", "tag", "main", False),
    ("main,release/*", "branch", "release/1.0", True),
    ("release/*", "branch", "releases", False),
    ("refs/tags/v*", "tag", "v1.0", True),
    ("refs/tags/v*", "branch", "v1.0", False),
    ("refs/heads/main", "branch", "main", True),
    ("", "branch", "main", False),
])  # fmt: skip
def test_ref_patterns_tell_branches_from_tags(stored, ref_type, name, matched):
    assert projects.matches(stored, ref_type, name) is matched
