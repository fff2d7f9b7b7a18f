"""Per-project secret variables: stored encrypted, given to builds by name, never shown.

A ``ci.yaml`` names the secrets a build needs (``build.secrets: [DEPLOY_TOKEN]``);
the values never appear in ``ci.yaml``, in the API's answers or in logs (they
are added to the build's masker). They are encrypted at rest with Fernet
(AES-128-CBC and HMAC-SHA256) under a key derived from ``CICD_SECRETS_KEY``,
which the web process (to store) and the agents (to read) share.
"""

from __future__ import annotations

import base64
import hashlib
import re

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr
from sqlalchemy import delete, select

from cicd import db
from cicd.errors import ConfigError, OpsCDError
from cicd.models import ProjectSecret, utcnow

__all__ = [
    "SecretError", "NAME", "set_secret", "list_secrets", "delete_secret", "secret_values",
    "encrypt", "decrypt",
]  # fmt: skip

#: Secret names are environment variable names.
NAME = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
MAX_VALUE_BYTES = 64 * 1024


class SecretError(OpsCDError):
    """A secret is missing, malformed, or cannot be decrypted."""


def _fernet(key: SecretStr | None) -> Fernet:
    if key is None or not key.get_secret_value():
        raise ConfigError(
            "CICD_SECRETS_KEY is not set: project secrets are encrypted with it; set the same "
            "long random string on the web process and on every agent"
        )
    digest = hashlib.sha256(b"opscd secrets v1\0" + key.get_secret_value().encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def set_secret(project: str, name: str, value: str, key: SecretStr | None) -> bool:
    """Store (or replace) a secret encrypted under ``key`` (``CICD_SECRETS_KEY``); True if new."""
    if not NAME.match(name):
        raise SecretError(f"secret name {name!r} must be a variable name such as DEPLOY_TOKEN")
    if not value or len(value.encode()) > MAX_VALUE_BYTES:
        raise SecretError(f"a secret's value must be 1 to {MAX_VALUE_BYTES} bytes")
    ciphertext = _fernet(key).encrypt(value.encode()).decode()
    with db.session() as session:
        row = session.get(ProjectSecret, (project, name))
        created = row is None
        if created:
            row = ProjectSecret(project=project, name=name, ciphertext=ciphertext)
            session.add(row)
        else:
            row.ciphertext, row.updated_at = ciphertext, utcnow()
        session.commit()
    return created


def list_secrets(project: str) -> list[ProjectSecret]:
    """The project's secrets, by name; callers show names and dates, never values."""
    with db.session() as session:
        return list(
            session.scalars(
                select(ProjectSecret)
                .where(ProjectSecret.project == project)
                .order_by(ProjectSecret.name)
            )
        )


def delete_secret(project: str, name: str) -> bool:
    with db.session() as session:
        deleted = session.execute(
            delete(ProjectSecret).where(
                ProjectSecret.project == project, ProjectSecret.name == name
            )
        ).rowcount
        session.commit()
    return bool(deleted)


def secret_values(project: str, names: list[str], key: SecretStr | None) -> dict[str, str]:
    """Decrypted values of ``names`` for a build; a missing one is a clear :class:`SecretError`."""
    if not names:
        return {}
    fernet = _fernet(key)
    with db.session() as session:
        rows = session.scalars(
            select(ProjectSecret).where(
                ProjectSecret.project == project, ProjectSecret.name.in_(names)
            )
        ).all()
    found = {row.name: row.ciphertext for row in rows}
    missing = [name for name in names if name not in found]
    if missing:
        raise SecretError(
            f"ci.yaml asks for secret(s) {', '.join(missing)}, not set for project {project}: "
            f"add them with `cicd secrets set {project} NAME`"
        )
    try:
        return {name: fernet.decrypt(found[name].encode()).decode() for name in names}
    except InvalidToken:
        raise SecretError(
            "cannot decrypt the project's secrets: CICD_SECRETS_KEY differs from the key "
            "they were stored with"
        ) from None


def encrypt(value: str, key: SecretStr | None) -> str:
    """``value`` encrypted like a secret variable (e.g. a project's own git password)."""
    return _fernet(key).encrypt(value.encode()).decode()


def decrypt(ciphertext: str, key: SecretStr | None) -> str:
    try:
        return _fernet(key).decrypt(ciphertext.encode()).decode()
    except InvalidToken:
        raise SecretError(
            "cannot decrypt a stored credential: CICD_SECRETS_KEY differs from the key it was "
            "stored with"
        ) from None
