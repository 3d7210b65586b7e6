"""The serving endpoint's bearer key: where it comes from, and a check that fails closed.

The key is a secret. It is never written to a run's config.yaml, never logged, never part of a
job's entrypoint or of a Serve deployment's arguments. Sources, first found wins:

    serve.api_key_file      a file holding the key (a mounted Kubernetes secret, a 0600 file)
    RAYKD_API_KEY_FILE      the same, from the environment
    RAYKD_API_KEY           the key itself, from the environment
    serve.api_key           the key in the config (a SecretStr): allowed in a YAML file the
                            user protects, refused on command lines

Each replica resolves the key itself from its own environment or file; one that finds none
(a key only the driver has, e.g. `serve.api_key` in a local YAML file, or a node without the
variable) checks against a salted SHA-256 verifier of the builder's key, never the key itself. Binding a non-loopback address without any key is refused by
the config, the CLI, the application builder and each replica.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from raykd.core.errors import RaykdError

API_KEY_ENV = "RAYKD_API_KEY"
API_KEY_FILE_ENV = "RAYKD_API_KEY_FILE"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name or 0.0.0.0-like wildcard: assume reachable from outside


def _read_file(path: str, where: str) -> str:
    try:
        key = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise RaykdError(f"{where} {path}: cannot read the API key file ({err.strerror or err})") from None
    if not key:
        raise RaykdError(f"{where} {path} is empty: put the API key in it")
    return key


def resolve_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from (in order) api_key_file, RAYKD_API_KEY_FILE, RAYKD_API_KEY, api_key; None if none."""
    if api_key_file:
        key = _read_file(api_key_file, "serve.api_key_file")
    elif os.environ.get(API_KEY_FILE_ENV):
        key = _read_file(os.environ[API_KEY_FILE_ENV], API_KEY_FILE_ENV)
    else:
        key = os.environ.get(API_KEY_ENV) or api_key or None
    return (key or "").strip() or None


def require_key(host: str, key: str | None, what: str = "serve.host") -> None:
    """Fail closed: a non-loopback bind address needs a key."""
    if key is None and not is_loopback(host):
        raise RaykdError(
            f"{what}={host} is reachable from other machines but no API key is set: set RAYKD_API_KEY (or "
            "RAYKD_API_KEY_FILE / serve.api_key_file pointing at a file holding the key), or bind 127.0.0.1")


class Verifier:
    """Checks `Authorization: Bearer <key>` in constant time; the scheme is case-insensitive.

    Holds only a salted SHA-256 of the key: the digests compared always have the same length, so
    `hmac.compare_digest` takes the same time whatever the header holds.
    """

    def __init__(self, salt: bytes, digest: bytes):
        self.salt, self.digest = salt, digest

    @classmethod
    def for_key(cls, key: str) -> Verifier:
        salt = secrets.token_bytes(16)
        return cls(salt, hashlib.sha256(salt + key.encode("utf-8")).digest())

    def accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").strip().partition(" ")
        # headers arrive decoded as latin-1; encoding back gives the bytes the client sent
        given = hashlib.sha256(self.salt + token.strip().encode("latin-1", "replace")).digest()
        return hmac.compare_digest(given, self.digest) and scheme.lower() == "bearer"
