"""``python -m ctxvars_mw demo``: serve the FastAPI example, or tour it in-process.

The demo serves ``examples/fastapi_app.py`` from the source checkout (the package's parent
directory) with in-memory defaults: an HS256 secret generated at start, printed nowhere but
inside the demo tokens it signs, an in-process event bus, no Redis. ``--tour`` drives the same
app in-process (Starlette's TestClient: no server, no network) and prints what happens.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from .errors import ConfigurationError
from .testing import make_context, mint_token
from .tier import Tier

__all__ = [
    "EXAMPLE_PATH",
    "GATED_ENDPOINTS",
    "DemoUser",
    "demo_users",
    "load_example",
    "serve",
    "tour",
]

#: The app the demo serves.
EXAMPLE_PATH = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"
#: The gated endpoints of the example, in the order of the tier staircase.
GATED_ENDPOINTS = (
    "/threads",
    "/beta",
    "/reports",
    "/audit/export",
    "/admin/users",
    "/admin/console",
)
TOKEN_LIFETIME = 3600


@dataclass(frozen=True)
class DemoUser:
    """A demo user: the tier, roles and id, and a signed token for them."""

    tier: Tier
    roles: tuple[str, ...]
    user_id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header carrying the token."""
        return {"Authorization": f"Bearer {self.token}"}


def load_example() -> ModuleType:
    """Import ``examples/fastapi_app.py`` from the source checkout."""
    if not EXAMPLE_PATH.is_file():
        raise ConfigurationError(
            "the demo serves examples/fastapi_app.py from a source checkout: clone the "
            'repository and run `python -m pip install -e ".[dev]"` in it'
        )
    spec = importlib.util.spec_from_file_location("ctxvars_mw_demo_app", EXAMPLE_PATH)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py path always has one
        raise ConfigurationError(f"cannot import {EXAMPLE_PATH}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def demo_users(secret: str, example: ModuleType) -> dict[Tier, DemoUser]:
    """One fresh user per tier (the default roles), each with a token valid for an hour."""
    users = {}
    for tier in Tier:
        ctx = make_context(tier, session_id=None)
        token = mint_token(
            secret,
            ctx=ctx,
            issuer=example.ISSUER,
            audience=example.AUDIENCE,
            expires_in=TOKEN_LIFETIME,
        )
        users[tier] = DemoUser(tier, tuple(sorted(ctx.roles)), ctx.user_id, token)
    return users


def curl_commands(base_url: str, users: dict[Tier, DemoUser]) -> str:
    """The ready-to-paste shell lines the demo prints."""
    lines = ["# 1. Paste the demo tokens (HS256, valid for one hour):"]
    lines += [f"export TOKEN_{u.tier.name}='{u.token}'" for u in users.values()]
    lines += ["", "# 2. Who am I? One call per tier:"]
    lines += [
        f'curl -s {base_url}/whoami -H "Authorization: Bearer $TOKEN_{u.tier.name}"'
        f"   # {u.tier.value}, roles: {', '.join(u.roles)}"
        for u in users.values()
    ]
    auth = "Authorization: Bearer $TOKEN_"
    lines += [
        "",
        "# 3. Gates (200 allowed, 403 denied, 401 without a token):",
        f'curl -i {base_url}/reports -H "{auth}BUSINESS"        # 200: tier business and above',
        f'curl -i {base_url}/reports -H "{auth}FREE"            # 403 insufficient_scope',
        f"curl -i {base_url}/reports                              # 401 authentication_required",
        f'curl -i {base_url}/admin/console -H "{auth}INTERNAL"  # 200: feature admin_console',
        f'curl -i {base_url}/reports -H "Authorization: Bearer not.a.token"   # 401 invalid_token',
        "",
        "# 4. A child-context chain (agent -> tool -> worker thread), each step its own id:",
        f'curl -s -X POST {base_url}/agents/run -H "{auth}ENTERPRISE"',
        "",
        "# 5. Metering: the free tier has 3 agent runs a day; the 4th is a 429 with Retry-After:",
        f'for n in 1 2 3 4; do curl -si -X POST {base_url}/agents/ask -H "{auth}FREE"'
        " | head -1; done",
        "",
        f"# 6. The OpenAPI docs: {base_url}/docs  (Authorize with a token above)",
    ]
    return "\n".join(lines)


def serve(host: str = "127.0.0.1", port: int = 8000, out: TextIO | None = None) -> None:
    """Serve the example with uvicorn until interrupted, after printing the curl commands."""
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - uvicorn is in the [all] and [dev] extras
        raise ConfigurationError('the demo needs uvicorn: pip install "ctxvars-mw[all]"') from None
    out = out or sys.stdout
    example = load_example()
    secret = secrets.token_urlsafe(32)
    app = example.create_app(secret)
    users = demo_users(secret, example)
    base_url = f"http://{host}:{port}"
    print(f"ctxvars_mw demo: serving examples/fastapi_app.py on {base_url}", file=out)
    print("Stop it with Ctrl+C.\n", file=out)
    print(curl_commands(base_url, users), file=out, flush=True)
    _log_with_context()
    uvicorn.run(app, host=host, port=port, log_level="info")


def _log_with_context() -> None:
    """Show the library's log lines (denials, auth failures) with the request's ids."""
    from .logging import ContextLogFilter

    handler = logging.StreamHandler()
    handler.addFilter(ContextLogFilter())
    handler.setFormatter(
        logging.Formatter("%(levelname)s [%(request_id)s %(user_id)s] %(name)s: %(message)s")
    )
    logger = logging.getLogger("ctxvars_mw")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- the tour ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    """Counts the audit records the tour produces instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def tour(out: TextIO | None = None) -> None:
    """Drive the example in-process and print what each caller gets, section by section."""
    from starlette.testclient import TestClient

    out = out or sys.stdout
    example = load_example()
    secret = secrets.token_urlsafe(32)
    users = demo_users(secret, example)
    logger, collect = logging.getLogger("ctxvars_mw"), _Collect()
    logger.addHandler(collect)
    propagate, logger.propagate = logger.propagate, False
    try:
        with TestClient(example.create_app(secret)) as client:
            sections = [
                _gates(client, users),
                _authentication(client, secret, example),
                _chain(client, users[Tier.ENTERPRISE]),
                _events(client, users[Tier.BUSINESS], users[Tier.FREE]),
                _metering(client, users[Tier.FREE], users[Tier.BUSINESS]),
            ]
    finally:
        logger.removeHandler(collect)
        logger.propagate = propagate
    print(
        "ctxvars_mw demo tour: examples/fastapi_app.py in-process (no server, no network)", file=out
    )
    for title, body in sections:
        print(f"\n== {title}\n{body}", file=out)
    audited = sum(1 for record in collect.records if record.name == "ctxvars_mw.audit")
    print(f"\n{audited} refusals audited on the ctxvars_mw.audit logger (ids only).", file=out)


def _gates(client: Any, users: dict[Tier, DemoUser]) -> tuple[str, str]:
    rows = [
        [
            u.tier.value,
            ",".join(u.roles),
            *(client.get(p, headers=u.headers).status_code for p in GATED_ENDPOINTS),
        ]
        for u in users.values()
    ]
    return "1. Each tier calls the gated endpoints (200 allowed, 403 denied)", table(
        ["tier", "roles", *GATED_ENDPOINTS], rows
    )


def _authentication(client: Any, secret: str, example: ModuleType) -> tuple[str, str]:
    user_id = make_context().user_id
    claims = {"issuer": example.ISSUER, "audience": example.AUDIENCE}
    forged = mint_token(secrets.token_urlsafe(32), user_id=user_id, **claims)
    expired = mint_token(secret, user_id=user_id, expires_in=-3600, **claims)
    cases = [
        ("no token", "/whoami", None),
        ("no token", "/reports", None),
        ("malformed token", "/reports", "not.a.token"),
        ("signed with another key", "/reports", forged),
        ("expired token", "/reports", expired),
    ]
    rows = []
    for case, path, token in cases:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = client.get(path, headers=headers)
        body = response.json()
        outcome = body.get("error") or f"user {body['user_id']}"
        rows.append(
            [case, f"GET {path}", response.status_code, outcome, body.get("error_description", "")]
        )
    return "2. Missing and invalid tokens (401)", table(
        ["credentials", "request", "status", "outcome", "why"], rows
    )


def _chain(client: Any, user: DemoUser) -> tuple[str, str]:
    response = client.post("/agents/run", headers=user.headers)
    steps = response.json()["steps"]
    rows = [
        [
            s["depth"],
            s["operation"] or "(the request)",
            s["request_id"],
            s["parent_request_id"] or "-",
        ]
        for s in steps
    ]
    body = table(["depth", "operation", "request_id", "parent_request_id"], rows)
    cid = response.headers["x-correlation-id"]
    body += f"\nevery step shares the request's correlation id {cid} (X-Correlation-ID)"
    return f"3. A child-context chain: POST /agents/run as {user.tier.value}", body


def _events(client: Any, first: DemoUser, second: DemoUser) -> tuple[str, str]:
    rows = []
    with (
        client.websocket_connect("/ws/events", headers=first.headers) as ws_first,
        client.websocket_connect("/ws/events", headers=second.headers) as ws_second,
    ):
        for ws in (ws_first, ws_second):
            ws.receive_json()  # "connected": registered on the bus
        for user, ws in ((first, ws_first), (second, ws_second)):
            run = client.post("/agents/run", headers=user.headers)
            event = ws.receive_json()  # the first event on this user's socket
            own = (
                event["user_id"] == user.user_id
                and event["correlation_id"] == run.headers["x-correlation-id"]
            )
            rows.append(
                [
                    f"{user.tier.value}'s socket",
                    event["event"]["kind"],
                    event["user_id"],
                    "yes" if own else "NO",
                ]
            )
    body = table(["socket", "first event", "for user", "its own run?"], rows)
    body += (
        f"\n{second.tier.value}'s socket was open during {first.tier.value}'s run"
        " and received none of its events"
    )
    return "4. Websocket events: each user's run reaches that user's socket only", body


def _metering(client: Any, free: DemoUser, business: DemoUser) -> tuple[str, str]:
    rows = []
    for user in (free, business):
        for call in range(1, 5):
            response = client.post("/agents/ask", headers=user.headers)
            body = response.json()
            left = body.get("agent_runs_left", body.get("error"))
            retry = response.headers.get("retry-after", "-")
            rows.append([user.tier.value, call, response.status_code, left, retry])
    body = table(["caller", "call", "status", "agent_runs left", "Retry-After (s)"], rows)
    body += (
        f"\nevery answer also carries RateLimit-Policy and RateLimit headers, e.g. "
        f"{response.headers['ratelimit-policy']} / {response.headers['ratelimit']}"
    )
    return "5. Metering: POST /agents/ask spends one of the tier's daily agent runs", body
