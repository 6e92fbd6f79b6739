"""The model registry: versioned model sets in a directory, one of them active.

    <dir>/<version>.json   a model set's bytes (`ModelSet.to_bytes`); the version is their hash
    <dir>/index.json       every saved set's manifest, the active version, and the promotions

A saved set never changes: its file is named by the SHA-256 of its bytes, and loading checks the
hash, so a decision that names a version names exactly the models that made it. Every write goes
to a temporary file first and is moved into place with `os.replace`, so a crash leaves the old
file or the new one, never half of one; index updates hold an `flock` on `<dir>/.lock`, so two
`tactician train` runs cannot lose each other's entries.

Promotion keeps a stack: `promote` pushes the version and `rollback` pops back to the one that
was active before it. A set whose duration predictor was refused (it did not beat the naive
baseline on held-out outcomes) is not promoted unless forced.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tactician.clock import SYSTEM_CLOCK, Clock
from tactician.errors import Conflict, InvalidInput, NotFound

if TYPE_CHECKING:  # LightGBM loads only when a set does: listing stays fast
    from tactician.decide.predictors import ModelSet

INDEX = "index.json"
FORMAT = 1
MIN_PREFIX = 6
VERSION = re.compile(r"[0-9a-f]{6,64}")
"""Characters of a version an operator must give at least."""


@dataclass(frozen=True)
class ModelEntry:
    """One saved model set, as the index lists it."""

    version: str
    created_at: float
    manifest: dict[str, Any]
    active: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "created_at": self.created_at,
            "active": self.active,
            "manifest": self.manifest,
        }


@dataclass(frozen=True)
class Promotion:
    """A change of the active version."""

    action: str
    """promote | rollback"""
    version: str | None
    """The version active afterwards."""
    previous: str | None
    at: float
    forced: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "version": self.version,
            "previous": self.previous,
            "at": self.at,
            "forced": self.forced,
        }


class ModelRegistry:
    """See the module docstring."""

    def __init__(self, directory: str | os.PathLike[str], clock: Clock = SYSTEM_CLOCK) -> None:
        self.directory = Path(directory)
        self.clock = clock

    # --- reading ---------------------------------------------------------------------------

    def list(self) -> builtins.list[ModelEntry]:
        """Every saved set, oldest first."""
        index = self._read_index()
        active = _active(index)
        return [_entry(item, active) for item in index["models"]]

    def show(self, version: str) -> dict[str, Any]:
        """A saved set's manifest (no model bytes), with when it was saved and whether it is
        active."""
        entry = self._entry(version)
        return {**entry.manifest, "created_at": entry.created_at, "active": entry.active}

    def load(self, version: str) -> ModelSet:
        """The model set, its hash checked against its version."""
        from tactician.decide.predictors import ModelSet

        full = self.resolve(version)
        path = self.path(full)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"model set {full}: its file {path} is missing") from None
        except OSError as exc:
            raise InvalidInput(f"model set {full}: cannot read it: {exc}") from None
        if hashlib.sha256(data).hexdigest()[: len(full)] != full:
            raise InvalidInput(f"model set {full}: {path} is corrupted (its hash does not match)")
        try:
            return ModelSet.from_bytes(data, full)
        except InvalidInput as exc:
            raise InvalidInput(f"model set {full}: {path} is corrupted ({exc.message})") from None

    def active(self) -> ModelSet | None:
        """The active model set, or None before any promotion (or after rolling back past the
        first one)."""
        version = self.active_version()
        return None if version is None else self.load(version)

    def active_version(self) -> str | None:
        return _active(self._read_index())

    def promotions(self) -> builtins.list[Promotion]:
        return [Promotion(**item) for item in self._read_index()["promotions"]]

    def resolve(self, version: str) -> str:
        """The full version a prefix of at least `MIN_PREFIX` characters names."""
        version = version.strip().lower()
        if len(version) < MIN_PREFIX:
            raise InvalidInput(
                f"give at least {MIN_PREFIX} characters of a model version, got {version!r}"
            )
        versions = [str(item["version"]) for item in self._read_index()["models"]]
        if version in versions:
            return version
        found = [v for v in versions if v.startswith(version)]
        if not found:
            raise NotFound(f"no model set has version {version!r}")
        if len(found) > 1:
            raise InvalidInput(
                f"model version {version!r} is ambiguous: {', '.join(sorted(found))}"
            )
        return found[0]

    def path(self, version: str) -> Path:
        return self.directory / f"{version}.json"

    # --- writing ---------------------------------------------------------------------------

    def save(self, models: ModelSet) -> str:
        """Store a model set; returns its version. Saving the same set twice changes nothing."""
        data = models.to_bytes()
        version = models.version
        if hashlib.sha256(data).hexdigest()[: len(version)] != version:
            raise InvalidInput(f"model set {version}: its version is not the hash of its bytes")
        with self._locked() as index:
            if not self.path(version).exists():
                _write_atomic(self.path(version), data)
            if all(item["version"] != version for item in index["models"]):
                index["models"].append(
                    {
                        "version": version,
                        "created_at": self.clock.now(),
                        "manifest": models.manifest(),
                    }
                )
        return version

    def promote(self, version: str, *, force: bool = False) -> Promotion:
        """Make a saved set the active one. A set whose duration predictor was refused is
        refused in turn, unless `force`."""
        full = self.resolve(version)
        self.load(full)  # never activate a file that does not load
        with self._locked() as index:
            manifest = next(m["manifest"] for m in index["models"] if m["version"] == full)
            if not force and not manifest["predictors"]["duration"]:
                raise Conflict(
                    f"model set {full}: its duration predictor was refused "
                    f"({_duration_verdict(manifest)}); use --force to promote it anyway"
                )
            previous = _active(index)
            event = Promotion("promote", full, previous, self.clock.now(), force)
            if previous != full:
                index["stack"].append(full)
                index["promotions"].append(event.to_json())
            return event

    def rollback(self) -> Promotion:
        """Go back to the version that was active before the current one."""
        _check_rollback(self._read_index())  # before the lock: a refusal creates nothing
        with self._locked() as index:
            _check_rollback(index)
            stack: list[str] = index["stack"]
            current = stack.pop()
            event = Promotion("rollback", stack[-1], current, self.clock.now())
            index["promotions"].append(event.to_json())
            return event

    # --- the index -------------------------------------------------------------------------

    def _entry(self, version: str) -> ModelEntry:
        full = self.resolve(version)
        index = self._read_index()
        item = next(m for m in index["models"] if m["version"] == full)
        return _entry(item, _active(index))

    def _read_index(self) -> dict[str, Any]:
        path = self.directory / INDEX
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {"format": FORMAT, "models": [], "stack": [], "promotions": []}
        except OSError as exc:
            raise InvalidInput(f"cannot read the model registry: {exc}") from None
        try:
            index = json.loads(data)
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                raise ValueError("not a registry index")
            for key in ("models", "stack", "promotions"):
                if not isinstance(index.get(key), list):
                    raise ValueError(f"no {key} list")
            saved = {_entry(item, None).version for item in index["models"]}
            for version in index["stack"]:
                if version not in saved:
                    raise ValueError(f"active version {version!r} was never saved")
        except (ValueError, TypeError, KeyError) as exc:
            raise InvalidInput(f"model registry index {path} is corrupted: {exc}") from None
        return index

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The index, read under the registry's lock and written back if the block succeeds."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            lock = open(self.directory / ".lock", "a+b")  # noqa: SIM115 (closed by `with` below)
        except OSError as exc:
            raise InvalidInput(f"cannot write to the model directory: {exc}") from None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            before = json.dumps(index, sort_keys=True)
            yield index
            if json.dumps(index, sort_keys=True) != before:
                text = json.dumps(index, sort_keys=True, indent=1) + "\n"
                _write_atomic(self.directory / INDEX, text.encode())


def _check_rollback(index: dict[str, Any]) -> None:
    stack = index["stack"]
    if len(stack) < 2:
        raise Conflict(
            "no model set to roll back to: "
            + (f"{stack[-1]} is the first" if stack else "none was ever promoted")
        )


def _active(index: dict[str, Any]) -> str | None:
    stack = index["stack"]
    return str(stack[-1]) if stack else None


def _entry(item: dict[str, Any], active: str | None) -> ModelEntry:
    if not isinstance(item["version"], str) or not VERSION.fullmatch(item["version"]):
        raise ValueError(f"{item['version']!r} is not a model version")
    return ModelEntry(
        version=str(item["version"]),
        created_at=float(item["created_at"]),
        manifest=dict(item["manifest"]),
        active=item["version"] == active,
    )


def _duration_verdict(manifest: dict[str, Any]) -> str:
    for check in manifest.get("validation", []):
        if check.get("predictor") == "duration_p50":
            return (
                f"{check['metric']} {check['model']:g} against the baseline's "
                f"{check['baseline']:g} on {check['rows']} held-out outcomes"
            )
    return "no validation"


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees the old file or the new one, whole."""
    try:
        _replace(path, data)
    except OSError as exc:
        raise InvalidInput(f"cannot write {path}: {exc}") from None


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
