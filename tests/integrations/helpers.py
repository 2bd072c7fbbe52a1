"""Shared by the framework tests: a table-driven authenticator and the error cases."""

from __future__ import annotations

from collections.abc import Mapping

from ctxvars_mw import Connection, Identity, InvalidTokenError, Tier

ALICE = "auth0|5f7c8ec7c33c6c004bbafe82"
BOB = "google-oauth2|109876543210987654321"

#: Opaque tokens (as API keys are) and who they stand for.
IDENTITIES: Mapping[str, Identity] = {
    "tok-alice-business-user": Identity(
        user_id=ALICE, tier=Tier.BUSINESS, roles=frozenset({"user"}), auth_method="api_key"
    ),
    "tok-bob-free-readonly": Identity(
        user_id=BOB, tier=Tier.FREE, roles=frozenset({"readonly"}), auth_method="api_key"
    ),
}


class TokenTableAuthenticator:
    """A real :class:`~ctxvars_mw.Authenticator` over a fixed token table (API-key style)."""

    def __init__(self, table: Mapping[str, Identity] = IDENTITIES) -> None:
        self._table = dict(table)

    async def authenticate(self, conn: Connection) -> Identity | None:
        """The token's identity; None without a token; 401 for an unknown token."""
        if conn.token is None:
            return None
        identity = self._table.get(conn.token)
        if identity is None:
            raise InvalidTokenError()
        return identity


def bearer(token: str) -> dict[str, str]:
    """An ``Authorization: Bearer`` header."""
    return {"Authorization": f"Bearer {token}"}
