"""The centre's side: the signed bundle for a site, from the live policy and the registry.

The signing key lives beside the model registry (`<models_dir>/../agent/signing.key`, written
by `tactician agent keygen`), so it follows the settings the centre already has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tactician.agent.bundle import PRIVATE_KEY_FILE, GlobalLimit, load_private_key, pack
from tactician.app import Tactician
from tactician.errors import NotFound, TacticianError
from tactician.settings import Settings
from tactician.store.registry import ModelRegistry

BUILTIN_TEXT = "name: builtin\n"


def key_dir(settings: Settings) -> Path:
    return Path(settings.models_dir).parent / "agent"


def global_limits(app: Tactician) -> dict[str, GlobalLimit]:
    """The live policy's per-kind rates: shared by all sites (see tactician.agent.bundle)."""
    limits = {}
    for kind, spec in app.gate.policy().bundle.limits.items():
        rate = spec.rate_limit
        if rate is not None:
            limits[kind] = GlobalLimit(rate.per_second, rate.burst)
    return limits


def issue_bundle(app: Tactician, site: str) -> dict[str, Any]:
    """The signed bundle for `site`: the live policy, its pinned and the active model sets."""
    key = load_private_key(key_dir(app.settings) / PRIVATE_KEY_FILE)
    live = app.store.deployed().get("live")
    policy = app.gate.policy()
    text = BUILTIN_TEXT if live is None else live[1]
    registry = ModelRegistry(app.settings.models_dir)
    try:
        active = registry.active_version()
    except TacticianError:
        active = None
    models: dict[str, bytes] = {}
    for version in [*policy.bundle.models.values(), *([active] if active else [])]:
        try:
            full = registry.resolve(version)
        except NotFound:
            raise NotFound(
                f"the live policy pins model set {version}, which is not saved"
            ) from None
        models[full] = registry.path(full).read_bytes()
    now = app.store.db_now()
    app.store.site_pulled(site, policy.version)
    return pack(
        key,
        site=site,
        issued_at=now,
        policy_version=policy.version,
        policy_text=text,
        models=models,
        active_model=active,
        global_limits=global_limits(app),
    )
