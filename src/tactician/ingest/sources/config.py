"""The ingest config file: a `sources:` list, validated like a policy bundle.

    sources:
      - name: orders
        type: redis
        url: redis://127.0.0.1:6379/0
        stream: orders
        max_pending: 5000

The first problem is reported on one line with its file, line and field, as
`ingest.yaml:5: sources[0].stream: is required for type redis`, by the policy module's loader
(the same YAML rules: duplicate keys refused, aliases resolved). The same list may instead be the
`sources:` section of the live policy bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from tactician.errors import InvalidInput
from tactician.govern.policy import (
    BundleError,
    _dotted,
    _line,
    _load,
    _problem,
    _refuse_duplicate_keys,
)
from tactician.govern.sources import Sources, SourceSpec


class SourcesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: Sources


def parse_sources(text: str, filename: str = "ingest.yaml") -> tuple[SourceSpec, ...]:
    """The sources in `text`; raises BundleError (an InvalidInput) naming file, line, field."""
    root, data = _load(text, filename)
    if root is None or not isinstance(data, dict):
        what = "empty" if root is None else f"a {type(data).__name__}"
        raise BundleError(filename, 1, "(top level)", f"must be a mapping with sources, not {what}")
    _refuse_duplicate_keys(root, filename)
    try:
        return SourcesFile.model_validate(data).sources
    except ValidationError as exc:
        error = exc.errors()[0]
        path = (*error["loc"], *error.get("ctx", {}).get("at", ()))
        raise BundleError(filename, _line(root, path), _dotted(path), _problem(error)) from None


def read_sources(path: str) -> tuple[SourceSpec, ...]:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    return parse_sources(text, path)


def select_sources(specs: Sequence[SourceSpec], names: Sequence[str]) -> list[SourceSpec]:
    """The sources named (all of them when none is), in the order declared."""
    known = {spec.name for spec in specs}
    for name in names:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(f"no source is named {name!r} (declared: {listed})")
    return [spec for spec in specs if not names or spec.name in names]
