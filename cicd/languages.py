"""Working defaults per language, for a ``ci.yaml`` that names only ``build.language``.

The original system built Java/Maven only; Go and Python were on its list of
what was missing. An agent may replace a default image with its own (e.g. one
from a local mirror) through ``CICD_IMAGE_<LANGUAGE>``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LanguageDefaults", "LANGUAGES"]


@dataclass(frozen=True)
class LanguageDefaults:
    image: str
    script: tuple[str, ...]
    #: Directories of the checkout the default script fills with downloaded dependencies,
    #: kept between builds when ``ci.yaml`` has no ``cache:``; and the variables that make
    #: the tool put them there (its own default is outside the checkout, ``~/.m2``).
    cache: tuple[str, ...] = ()
    cache_environment: tuple[tuple[str, str], ...] = ()


LANGUAGES: dict[str, LanguageDefaults] = {
    "java": LanguageDefaults(
        image="maven:3.9-eclipse-temurin-17",
        script=("mvn -B package",),
        cache=(".m2/repository",),
        # Relative: Maven resolves it against the step's directory, the checkout.
        cache_environment=(("MAVEN_OPTS", "-Dmaven.repo.local=.m2/repository"),),
    ),
    "go": LanguageDefaults(
        image="golang:1.23",
        script=("go build ./...", "go test ./..."),
    ),
    "python": LanguageDefaults(
        image="python:3.12",
        script=(
            "if [ -f requirements.txt ]; then python3 -m pip install -r requirements.txt; fi",
            "python3 -m unittest discover -v",
        ),
    ),
}
