"""Who owns a job or an A/B run: a keyed fingerprint of the API key that created it.

Owners are stored with jobs and, for A/B runs, on disk (``job.json``). A bare hash of a key could be checked
against guessed keys by anyone who reads the file; an HMAC under the server's secret cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

OWNER_SECRET_FILE = ".owner-secret"


def owner_secret(ab_dir: Path | None) -> bytes:
    """The key under which owners are fingerprinted: kept in ``ab_dir`` (created once, readable by this user only)
    so that A/B runs stay their owners' across restarts; a fresh one per process without an ``ab_dir``."""
    if ab_dir is None:
        return secrets.token_bytes(32)
    path = ab_dir.expanduser() / OWNER_SECRET_FILE
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_bytes(32))
    return path.read_bytes()


def key_fingerprint(key: str, secret: bytes) -> str:
    """HMAC-SHA256 of ``key`` under ``secret``, hex."""
    return hmac.new(secret, key.encode("utf-8"), hashlib.sha256).hexdigest()
