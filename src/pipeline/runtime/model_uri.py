"""The model URIs the tools accept, parsed in one place.

- ``models:/NAME@ALIAS`` and ``models:/NAME/VERSION``: a registered version;
- ``models:/m-<id>``: MLflow 3's logged model, as a run logs it (no registry needed).
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

REGISTERED = re.compile(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))")
LOGGED = re.compile(r"models:/(m-[0-9a-f]+)")


class ModelUri(NamedTuple):
    name: Optional[str]      # registered model name (None for a logged model)
    alias: Optional[str]
    version: Optional[str]
    model_id: Optional[str]  # m-<id> of a logged model


def parse_model_uri(uri: str) -> Optional[ModelUri]:
    """The parts of a ``models:/`` URI, or None when it has neither shape."""
    uri = uri.strip()
    if match := LOGGED.fullmatch(uri):
        return ModelUri(None, None, None, match.group(1))
    if match := REGISTERED.fullmatch(uri):
        name, alias, version = match.groups()
        return ModelUri(name, alias, version, None)
    return None


def parse_alias_uri(uri: str) -> Optional[tuple[str, str]]:
    """(name, alias) of ``models:/NAME@ALIAS``; None for any other text."""
    parsed = parse_model_uri(uri)
    return (parsed.name, parsed.alias) if parsed and parsed.alias else None
