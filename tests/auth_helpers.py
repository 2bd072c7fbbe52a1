"""Shared pieces of the auth tests: real keys, token builders, a Starlette app, the server.

Keys are generated once per test session with ``cryptography``; tokens are signed with
PyJWT, or assembled by hand (``forge``) when a test needs JSON PyJWT would never write.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from ctxvars_mw import ContextMiddleware, get_context
from tests.servers import uvicorn_server

SECRET = b"0123456789abcdef0123456789abcdef-hs256-test-secret"
ISSUER = "https://issuer.test.invalid"
AUDIENCE = "ctxvars-api"
USER = "auth0|5f7c8ec7c33c6c004bbafe82"


_KEYS: dict[tuple[str, int], Any] = {}
_CURVES = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}


def _cached(kind: str, n: int, make: Any) -> Any:
    if (kind, n) not in _KEYS:
        _KEYS[kind, n] = make()
    return _KEYS[kind, n]


def rsa_key(n: int = 0) -> rsa.RSAPrivateKey:
    """An RSA-2048 private key, generated once per session (``n`` tells apart several)."""
    return _cached("RSA", n, lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(curve: str = "P-256", n: int = 0) -> ec.EllipticCurvePrivateKey:
    """An EC private key on ``curve``."""
    return _cached(curve, n, lambda: ec.generate_private_key(_CURVES[curve]()))


def ed_key(n: int = 0) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 private key."""
    return _cached("Ed25519", n, ed25519.Ed25519PrivateKey.generate)


def claims(**overrides: Any) -> dict[str, Any]:
    """A valid payload for ISSUER/AUDIENCE/USER; ``None`` values remove a claim."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": USER,
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    payload.update(overrides)
    return {k: v for k, v in payload.items() if v is not None}


def sign(payload: dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    """A token signed by PyJWT."""
    return jwt.encode(payload, key, algorithm=alg, headers=headers or None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: str, payload: str, key: Any = SECRET, alg: str = "HS256") -> str:
    """A token from raw header/payload JSON text, signed with ``alg`` (HS* with any bytes as
    the secret, even a PEM key, which PyJWT would refuse)."""
    signing_input = f"{_b64(header.encode())}.{_b64(payload.encode())}"
    if alg.startswith("HS"):
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        signature = hmac.new(key, signing_input.encode(), digest[alg]).digest()
    else:
        algorithm = get_default_algorithms()[alg]
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{_b64(signature)}"


def public_jwk(private_key: Any, kid: str, alg: str) -> dict[str, Any]:
    """The public JWK of ``private_key`` with ``kid`` and ``alg``."""
    algorithm = get_default_algorithms()[alg]
    jwk: dict[str, Any] = algorithm.to_jwk(private_key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


async def whoami(request: Request) -> JSONResponse:
    """What the endpoint sees of the current context."""
    ctx = get_context()
    return JSONResponse(
        {
            "user_id": ctx.user_id,
            "authenticated": ctx.is_authenticated,
            "tier": ctx.tier.value,
            "roles": sorted(ctx.roles),
            "permissions": sorted(ctx.permissions),
            "features": sorted(ctx.features),
            "session_id": ctx.session_id,
            "auth_method": ctx.auth_method,
        }
    )


async def ws_whoami(websocket: WebSocket) -> None:
    """Accept, send the current user, close."""
    await websocket.accept()
    ctx = get_context()
    await websocket.send_json({"user_id": ctx.user_id, "authenticated": ctx.is_authenticated})
    await websocket.close()


def make_app(**options: Any) -> ContextMiddleware:
    """A Starlette app (``/whoami``, websocket ``/ws``) wrapped in ContextMiddleware."""
    app = Starlette(routes=[Route("/whoami", whoami), WebSocketRoute("/ws", ws_whoami)])
    return ContextMiddleware(app, **options)


def client_for(app: Any) -> httpx.AsyncClient:
    """An httpx client that drives ``app`` in-process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app.test")


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def auth_server() -> Iterator[str]:
    """The stand-in authorization server (tests/apps/auth_server.py) under uvicorn."""
    with uvicorn_server("tests.apps.auth_server:app") as url:
        yield url


@pytest.fixture
async def control(auth_server: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the server's /control endpoints; the server state is reset first."""
    async with httpx.AsyncClient(base_url=auth_server) as client:
        await client.post("/control/reset", json={})
        yield client


def dumps(value: Any) -> str:
    """Compact JSON."""
    return json.dumps(value, separators=(",", ":"))
