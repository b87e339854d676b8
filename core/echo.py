"""What the pipeline may say back about its input: short quotes, never a secret.

Every value a message, a log line or an event repeats passes through here. `quote` bounds how
much of a value is shown (a 1 MB string or a deeply nested list costs a fixed prefix, not a
full repr); `redact` hides what looks like a credential: the ``user:password@`` of a URL,
``token=`` / ``password=`` style query values, and the values of the environment variables
that hold credentials (`SECRET_ENV`). Credentials are only ever read from the environment
(`REGISTRY_ENV` for registries, ``HF_TOKEN`` for the Hugging Face Hub).
"""

from __future__ import annotations

import os
import re
import reprlib

from .errors import RecipeError

REGISTRY_ENV = ("EDGEPRUNE_REGISTRY_USER", "EDGEPRUNE_REGISTRY_PASSWORD")
SECRET_ENV = ("EDGEPRUNE_REGISTRY_PASSWORD", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
MIN_SECRET = 6  # shorter environment values are too likely to occur by chance to be searched for
MASK = "***"

_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#@\s]+@")
_QUERY = re.compile(r"(?i)(?P<key>[?&;](?:[a-z0-9_.-]*(?:token|password|passwd|pwd|secret|api[_-]?key|auth|"
                    r"signature|credential)s?|sig)=)[^&;#\s'\"]+")
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 4
_REPR.maxlevel = 2


def redact(text: str) -> str:
    """``text`` with every secret-looking part replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY.sub(lambda m: f"{m['key']}{MASK}", text)
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= MIN_SECRET:
            text = text.replace(value, MASK)
    return text


def looks_secret(text: str) -> bool:
    return redact(text) != text


def clip(text: str, limit: int = 200) -> str:
    """At most ``limit`` characters of ``text`` (redacted), on one line."""
    text = " ".join(redact(text).splitlines())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def quote(value: object) -> str:
    """A short repr of a value from the input, whatever its size or depth."""
    return clip(_REPR.repr(value), 80)


def refuse_credentials(value: str, field: str) -> None:
    """Input never carries credentials: they would be echoed, logged, saved in the run folder and pushed."""
    if looks_secret(value):
        raise RecipeError(f"{quote(value)} holds a credential (user:password@, a token= or password= value, or a "
                          f"credential variable's value); remove it: credentials come only from the environment, "
                          f"{' and '.join(REGISTRY_ENV)} for a registry, HF_TOKEN for the Hugging Face Hub", field=field)
