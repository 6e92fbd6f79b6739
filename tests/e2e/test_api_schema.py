"""Schemathesis against the OpenAPI schema of a real API server: `schemathesis run` sends
generated requests (a bounded number per operation, as an admin) and checks that none gets a
5xx and that every response matches the schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tactician.app import Tactician
from tactician.domain import KindSpec, NewTask
from tactician.govern.roles import Actor, Role
from tactician.settings import Settings
from tests.e2e.serving import serving

pytestmark = pytest.mark.timeout(900)


def test_no_5xx_and_every_response_matches_the_schema(tmp_path: Path) -> None:
    config = Settings(db=f"sqlite:///{tmp_path / 'api.db'}", models_dir=str(tmp_path / "models"))
    app = Tactician(settings=config)
    app.store.register_kinds([KindSpec("job", pool="p")])
    app.submit_many([NewTask("job", {"n": i}) for i in range(3)])
    secret = app.gate.create_token(Actor("root", Role.ADMIN), "fuzzer", Role.ADMIN)
    with serving(config) as client:
        result = subprocess.run(
            [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{client.base_url}/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance",
                "--max-examples",
                "10",
                "--workers",
                "1",
                "--header",
                f"Authorization: Bearer {secret}",
                "--seed",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=840,
            cwd=tmp_path,  # its reports and cache stay out of the checkout
            check=False,
        )
    app.close()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "passed" in result.stdout.lower()
