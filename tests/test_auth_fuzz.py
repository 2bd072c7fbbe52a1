"""Property tests: random bytes and mutated tokens are never accepted and never a 500."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ctxvars_mw import InvalidTokenError, JWTAuthenticator
from tests.auth_helpers import AUDIENCE, SECRET, claims, make_app, sign

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
AUTH = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, cache_size=0)
APP = make_app(authenticator=AUTH, require_authentication=True)
VALID = sign(claims(exp=4_000_000_000, iat=None, roles=["user"], tier="business"))
ALPHABET = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/~ !"{}'


async def _status(authorization: bytes) -> int:
    """Drive the middleware + Starlette app once; return the response status."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/whoami",
        "raw_path": b"/whoami",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"app.test"), (b"authorization", authorization)],
        "client": ("127.0.0.1", 1234),
        "server": ("app.test", 80),
    }
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    await APP(scope, receive, send)
    assert len(statuses) == 1
    return statuses[0]


def test_the_valid_token_is_accepted() -> None:
    """The token the mutations start from is itself accepted (200)."""
    assert asyncio.run(_status(f"Bearer {VALID}".encode())) == 200


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes_after_bearer_are_refused(raw: bytes) -> None:
    """Any bytes as the bearer credential give a 401 (or 400), never 200 or 500."""
    assert asyncio.run(_status(b"Bearer " + raw)) in (400, 401)


@FUZZ
@given(st.binary(max_size=300))
def test_random_authorization_headers_are_refused(raw: bytes) -> None:
    """Any bytes as the whole Authorization header give a 401 (or 400), never 200 or 500."""
    assert asyncio.run(_status(raw)) in (400, 401)


@st.composite
def mutations(draw: st.DrawFn) -> str:
    """VALID with 1-4 random edits: replace, insert or delete a character, or truncate."""
    token = list(VALID)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(0, len(token) - 1)))
        char = draw(st.sampled_from(ALPHABET))
        if kind == "replace" and token:
            token[at] = char
        elif kind == "insert":
            token.insert(at, char)
        elif kind == "delete" and token:
            del token[at]
        else:
            del token[at:]
    return "".join(token)


@FUZZ
@given(mutations())
def test_mutated_tokens_are_never_accepted(token: str) -> None:
    """A valid token with any edit is refused: 401 through the app, InvalidTokenError direct."""
    # Spaces around the credentials are not part of the token (the middleware trims them).
    assume(token.strip(" ") != VALID)
    assert asyncio.run(_status(f"Bearer {token}".encode())) in (400, 401)
    try:
        asyncio.run(AUTH.verify(token))
    except InvalidTokenError:
        pass
    else:
        raise AssertionError("a mutated token was accepted")


@FUZZ
@given(st.text(max_size=400))
def test_arbitrary_text_only_raises_invalid_token(text: str) -> None:
    """verify() on any string raises InvalidTokenError and nothing else."""
    try:
        asyncio.run(AUTH.verify(text))
    except InvalidTokenError:
        return
    raise AssertionError("arbitrary text was accepted")
