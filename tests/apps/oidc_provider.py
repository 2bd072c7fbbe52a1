"""node-oidc-provider (tests/idp/provider.mjs) on 127.0.0.1, for the identity-provider tests.

Install it with ``npm ci --prefix tests/idp``. Without node or the package the tests that
need it are skipped, and fail in CI (CI=true), where the install step must have run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest

from tests.servers import ROOT, free_port, serve_process

IDP_DIR = ROOT / "tests" / "idp"
API = "https://api.example.test"
SERVICE = ("service-a", "service-a-secret")
RESOURCE_SERVER = ("resource-server", "resource-server-secret")


@dataclass(frozen=True)
class Provider:
    """A running provider: its issuer URL and a few calls against it."""

    issuer: str

    async def _post(self, path: str, **kwargs: object) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.issuer) as client:
            response = await client.post(path, **kwargs)  # type: ignore[arg-type]
        response.raise_for_status()
        return response

    async def token(self, resource: str, scope: str = "api:read") -> str:
        """An access token for ``resource`` (e.g. ``f"{API}/es256"``) by client credentials."""
        data = {"grant_type": "client_credentials", "resource": resource, "scope": scope}
        response = await self._post("/token", data=data, auth=SERVICE)
        return str(response.json()["access_token"])

    async def revoke(self, token: str) -> None:
        """Revoke ``token`` at the provider (RFC 7009)."""
        await self._post("/token/revocation", data={"token": token}, auth=RESOURCE_SERVER)

    async def hits(self, path: str) -> int:
        """How many requests the provider has had for ``path``."""
        async with httpx.AsyncClient(base_url=self.issuer) as client:
            return int((await client.get("/control/hits")).json().get(path, 0))

    async def rotate(self) -> None:
        """Replace every signing key with a new one (the old kids leave the JWKS)."""
        await self._post("/control/rotate")


def _missing() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        return "oidc-provider is not installed (npm ci --prefix tests/idp)"
    return None


@contextmanager
def run_provider() -> Iterator[Provider]:
    """Start the provider on a free port; stop it afterwards."""
    missing = _missing()
    if missing is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    port = free_port()
    node = shutil.which("node")
    assert node is not None
    with serve_process([node, "provider.mjs", str(port)], port, cwd=IDP_DIR) as url:
        yield Provider(url)
