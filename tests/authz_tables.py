"""The default policy's tables of API.md §5, written out independently of ctxvars_mw/policy.py.

Shared by the authorization tests so each endpoint style is checked against the same contract.
"""

from __future__ import annotations

from ctxvars_mw import Identity, Tier

#: The lowest tier that grants each feature (features are cumulative up the tiers).
FEATURE_TIER: dict[str, Tier] = {
    **dict.fromkeys(["chat", "basic_agents", "history_7d"], Tier.FREE),
    **dict.fromkeys(["beta_features", "history_30d"], Tier.EARLY),
    **dict.fromkeys(["advanced_agents", "api_access"], Tier.BUSINESS),
    **dict.fromkeys(
        [
            "sso",
            "custom_integrations",
            "audit_export",
            "dedicated_support",
            "custom_policies",
            "data_residency",
            "history_unlimited",
            "priority_queue",
            "sla",
        ],
        Tier.ENTERPRISE,
    ),
    **dict.fromkeys(["impersonation", "admin_console"], Tier.INTERNAL),
}
READONLY = frozenset({"threads:read", "agents:read"})
USER = READONLY | {"threads:write", "agents:execute", "tools:execute"}
ADMIN = USER | {
    "threads:delete",
    "agents:manage",
    "tools:manage",
    "users:read",
    "users:manage",
    "billing:read",
    "billing:manage",
    "resources:read_any",
}
#: What each role holds ("none": an authenticated user without roles).
ROLE_HOLDS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "readonly": READONLY,
    "user": USER,
    "admin": ADMIN,
}

#: The resource owner of the ownership tests.
OWNER = "auth0|5f7c8ec7c33c6c004bbafe82"
#: Bearer token → Identity: one token per tier and one per role ("none": no roles).
GATE_TOKENS: dict[str, Identity] = {
    **{f"tok-tier-{t.value}": Identity(user_id=f"user_{t.value}_7Hq2Lx9Rk4", tier=t) for t in Tier},
    **{
        f"tok-role-{r}": Identity(
            user_id=f"user_{r}_5Tz8Wc3Np6", roles=frozenset() if r == "none" else frozenset({r})
        )
        for r in ROLE_HOLDS
    },
}
