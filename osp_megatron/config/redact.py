"""Credentials never leave the process: URIs and values are redacted before they are printed, logged as
tracker params, written to ``config.yaml`` or saved in a checkpoint.

``redact_secrets("http://alice:s3cret@host:5000/?token=abc")`` → ``"http://alice:***@host:5000/?token=***"``.
"""
from __future__ import annotations

import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@/\s]+)@")
_TOKEN_ONLY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<token>[^:/@\s]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:[A-Za-z0-9_\-]*(?:token|password|passwd|secret|key|signature|credential|auth)[A-Za-z0-9_\-]*))="
    r"(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)
MASK = "***"


def redact_secrets(text: str) -> str:
    """``text`` with URI passwords, bare URI tokens (``https://TOKEN@host``) and secret-looking query values masked."""
    if not isinstance(text, str) or not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    out = _TOKEN_ONLY.sub(lambda m: f"{m['scheme']}{MASK}@", out)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}={MASK}", out)


def redact_tree(value: Any) -> Any:
    """A copy of a nested dict / list / str structure with every string passed through :func:`redact_secrets`."""
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return value
