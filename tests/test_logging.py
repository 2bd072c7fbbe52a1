"""Logging: ContextLogFilter, the chained record factory, the structlog processor, dictConfig."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from ctxvars_mw import (
    ConfigurationError,
    ContextThreadPoolExecutor,
    Tier,
    UserExecutionContext,
    use_context,
)
from ctxvars_mw.logging import (
    ContextLogFilter,
    StructlogProcessor,
    install_record_factory,
    structlog_processor,
    uninstall_record_factory,
)
from tests.integrations.helpers import ALICE, bearer
from tests.servers import uvicorn_server

CTX = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82", tier=Tier.BUSINESS)
FORMAT = "%(name)s|%(request_id)s|%(correlation_id)s|%(user_id)s|%(tier)s|%(message)s"


@pytest.fixture
def restore_factory() -> Iterator[None]:
    """Leave the process-wide LogRecordFactory as the test found it."""
    before = logging.getLogRecordFactory()
    try:
        yield
    finally:
        uninstall_record_factory()
        logging.setLogRecordFactory(before)


@pytest.fixture
def stream_logger() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger configured through dictConfig with the filter, writing to a buffer."""
    buffer = io.StringIO()
    name = "ctxvars_test.dictconfig"
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {"ctx": {"()": "ctxvars_mw.logging.ContextLogFilter"}},
            "formatters": {"plain": {"format": FORMAT}},
            "handlers": {
                "buf": {
                    "class": "logging.StreamHandler",
                    "stream": buffer,
                    "filters": ["ctx"],
                    "formatter": "plain",
                }
            },
            "loggers": {name: {"handlers": ["buf"], "level": "DEBUG", "propagate": False}},
        }
    )
    logger = logging.getLogger(name)
    try:
        yield logger, buffer
    finally:
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()


def _record(name: str = "thirdparty.lib") -> logging.LogRecord:
    return logging.getLogger(name).makeRecord(name, logging.INFO, __file__, 1, "msg", (), None)


def test_filter_from_dictconfig_adds_the_ids(
    stream_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """Inside a context the line carries its ids; outside, dashes."""
    logger, buffer = stream_logger
    assert isinstance(logger.handlers[0].filters[0], ContextLogFilter)
    with use_context(CTX):
        logger.info("inside")
    logger.info("outside")
    inside, outside = buffer.getvalue().splitlines()
    assert inside == (
        f"ctxvars_test.dictconfig|{CTX.request_id}|{CTX.correlation_id}|{CTX.user_id}|business|inside"
    )
    assert outside == "ctxvars_test.dictconfig|-|-|-|-|outside"


def test_filter_keeps_values_passed_in_extra(
    stream_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """A record that already has the fields (extra=) is left as it is."""
    logger, buffer = stream_logger
    with use_context(CTX):
        logger.info(
            "explicit",
            extra={
                "request_id": "req-explicit-1",
                "correlation_id": "c",
                "user_id": "u",
                "tier": "t",
            },
        )
    assert buffer.getvalue().startswith("ctxvars_test.dictconfig|req-explicit-1|c|u|t|")


def test_records_from_worker_threads_carry_the_submitters_ids(
    stream_logger: tuple[logging.Logger, io.StringIO],
) -> None:
    """A job on ContextThreadPoolExecutor logs with the request's ids."""
    logger, buffer = stream_logger
    with ContextThreadPoolExecutor(max_workers=2) as pool, use_context(CTX):
        pool.submit(logger.warning, "from a thread").result(timeout=5)
    assert f"|{CTX.request_id}|" in buffer.getvalue()


def test_record_factory_annotates_every_record_and_chains_the_previous(
    restore_factory: None,
) -> None:
    """Records of any logger get the ids; the factory installed before still runs."""
    previous = logging.getLogRecordFactory()

    def tagging_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.tagged = True
        return record

    logging.setLogRecordFactory(tagging_factory)
    install_record_factory()
    install_record_factory()  # idempotent: one layer only
    ours = logging.getLogRecordFactory()
    assert getattr(ours, "previous", None) is tagging_factory
    with use_context(CTX):
        record = _record()
    assert (record.request_id, record.user_id, record.tier) == (
        CTX.request_id,
        CTX.user_id,
        "business",
    )
    assert record.tagged is True
    assert _record().request_id == "-"
    uninstall_record_factory()
    assert logging.getLogRecordFactory() is tagging_factory
    assert not hasattr(_record(), "request_id")


def test_uninstall_under_a_later_factory_switches_ours_off(restore_factory: None) -> None:
    """If another factory was chained on top, uninstalling turns ours into a pass-through."""
    install_record_factory()
    ours = logging.getLogRecordFactory()

    def later(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return ours(*args, **kwargs)

    logging.setLogRecordFactory(later)
    uninstall_record_factory()
    assert logging.getLogRecordFactory() is later
    with use_context(CTX):
        assert not hasattr(_record(), "request_id")


def test_structlog_processor_adds_ids_only_inside_a_context() -> None:
    """The processor adds the ids inside a context, nothing outside, and keeps explicit keys."""
    buffer = io.StringIO()
    structlog.configure(
        processors=[structlog_processor, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(file=buffer),
        cache_logger_on_first_use=False,
    )
    try:
        log = structlog.get_logger()
        with use_context(CTX.child("agent.plan")):
            log.info("inside")
            log.info("explicit", user_id="someone-else-0001")
        log.info("outside")
    finally:
        structlog.reset_defaults()
    inside, explicit, outside = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert inside["user_id"] == CTX.user_id
    assert inside["correlation_id"] == CTX.request_id
    assert inside["operation_depth"] == 1
    assert inside["tier"] == "business"
    assert explicit["user_id"] == "someone-else-0001"
    assert outside == {"event": "outside"}


def test_uvicorn_and_third_party_records_carry_ids_and_never_tokens(tmp_path: Path) -> None:
    """Under a real uvicorn configured by dictConfig, the access log and library records carry
    the request's ids; the bearer token and invalid raw header values never reach the log."""
    log_file = tmp_path / "app.log"
    handler = {"class": "logging.FileHandler", "filename": str(log_file), "formatter": "plain"}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": FORMAT}},
        "handlers": {"file": handler},
        "root": {"handlers": ["file"], "level": "DEBUG"},
        "loggers": {"uvicorn.access": {"handlers": ["file"], "level": "INFO", "propagate": False}},
    }
    config_file = tmp_path / "logging.json"
    config_file.write_text(json.dumps(config))
    token = "tok-alice-business-user"
    args = ("--log-config", str(config_file), "--log-level", "debug")
    with uvicorn_server("tests.integrations.logging_app:app", extra_args=args) as url:
        ok = httpx.get(f"{url}/ok", headers={**bearer(token), "X-Correlation-ID": "corr-abc-123"})
        bad = httpx.get(
            f"{url}/bad",
            headers={**bearer("tok-forged-by-attacker"), "X-Request-ID": "evil value!"},
        )
    assert ok.status_code == 204
    assert bad.status_code == 401
    text = log_file.read_text()
    request_id = ok.headers["X-Request-ID"]
    assert f"thirdparty.client|{request_id}|corr-abc-123|{ALICE}|business|handled /ok" in text
    assert any(
        line.startswith(f"uvicorn.access|{request_id}|corr-abc-123|{ALICE}|")
        for line in text.splitlines()
    )
    for secret in (token, "tok-forged-by-attacker", "evil value!"):
        assert secret not in text


# -- denials under the documented logging set-up (record factory and filter) -----------------


class _Collect(logging.Handler):
    """Keeps every record it handles, formatted, after the handler's filters ran."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter(FORMAT))
        self.addFilter(ContextLogFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def full_logging(restore_factory: None) -> Iterator[_Collect]:
    """The record factory and the log filter installed, everything at DEBUG on the root."""
    root = logging.getLogger()
    handler = _Collect()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    install_record_factory()
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _audits(handler: _Collect) -> list[logging.LogRecord]:
    return [r for r in handler.records if r.name == "ctxvars_mw.audit"]


def test_decorator_denials_are_audited_under_the_record_factory(full_logging: _Collect) -> None:
    """requires_* decorators raise 401/403 (not KeyError) and the audit record names the user."""
    from ctxvars_mw import (
        AuthenticationRequiredError,
        PermissionDeniedError,
        requires_permission,
        requires_role,
        requires_tier,
    )

    @requires_tier(Tier.ENTERPRISE)
    def enterprise_only() -> str:
        return "ok"

    @requires_role("admin")
    @requires_permission("billing:manage")
    async def admin_only() -> str:
        return "ok"

    with use_context(CTX), pytest.raises(PermissionDeniedError):
        enterprise_only()
    with use_context(UserExecutionContext.anonymous()), pytest.raises(AuthenticationRequiredError):
        enterprise_only()
    with use_context(CTX), pytest.raises(PermissionDeniedError):
        asyncio.run(admin_only())
    denied, anonymous, stacked = _audits(full_logging)
    assert (denied.user_id, denied.request_id, denied.status, denied.check) == (
        CTX.user_id,
        CTX.request_id,
        403,
        "tier",
    )
    assert (anonymous.user_id, anonymous.status, anonymous.levelno) == ("anonymous", 401, 20)
    assert (stacked.check, stacked.required) == ("role", ["admin"])
    assert (
        f"|{CTX.request_id}|{CTX.correlation_id}|{CTX.user_id}|business|" in (full_logging.lines[0])
    )


def test_authorize_audits_the_checked_context_not_the_current_one(full_logging: _Collect) -> None:
    """authorize(ctx=other) under the factory: 403, and the record carries other's ids."""
    from ctxvars_mw import AuthenticationRequiredError, PermissionDeniedError, authorize

    other = UserExecutionContext(user_id="google-oauth2|109876543210987654321")
    with use_context(CTX), pytest.raises(PermissionDeniedError):
        authorize("delete", owner_id="someone-else-123456789", ctx=other)
    with pytest.raises(AuthenticationRequiredError):
        authorize("read", owner_id=CTX.user_id)
    denied, anonymous = _audits(full_logging)
    assert (denied.user_id, denied.request_id, denied.check) == (
        other.user_id,
        other.request_id,
        "ownership:delete",
    )
    assert (anonymous.user_id, anonymous.request_id, anonymous.status) == ("-", "-", 401)


async def test_fastapi_dependency_denials_stay_401_and_403(full_logging: _Collect) -> None:
    """FastAPI require_* dependencies answer 401/403 with the factory and filter installed."""
    from fastapi import FastAPI

    from ctxvars_mw.integrations.fastapi import require_tier, setup
    from tests.integrations.helpers import TokenTableAuthenticator

    app = FastAPI()
    setup(app, authenticator=TokenTableAuthenticator())

    @app.get("/enterprise", dependencies=[require_tier("enterprise")])
    async def enterprise() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        lower = await client.get("/enterprise", headers=bearer("tok-alice-business-user"))
        anonymous = await client.get("/enterprise")
    assert (lower.status_code, anonymous.status_code) == (403, 401)
    assert [(r.status, r.user_id) for r in _audits(full_logging)] == [
        (403, ALICE),
        (401, "anonymous"),
    ]


async def test_middleware_refusals_stay_401_and_403_in_a_starlette_app(
    full_logging: _Collect,
) -> None:
    """ContextMiddleware's own 401s and a 403 raised in a Starlette endpoint are not 500s."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from ctxvars_mw import ContextMiddleware, requires_permission
    from ctxvars_mw.integrations.starlette import install_exception_handlers
    from tests.integrations.helpers import TokenTableAuthenticator

    @requires_permission("users:manage")
    async def manage(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    inner = Starlette(routes=[Route("/manage", manage)])
    install_exception_handlers(inner)
    app = ContextMiddleware(
        inner,
        authenticator=TokenTableAuthenticator(),
        require_authentication=True,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        missing = await client.get("/manage")
        invalid = await client.get("/manage", headers=bearer("tok-unknown"))
        lacking = await client.get("/manage", headers=bearer("tok-alice-business-user"))
    assert (missing.status_code, invalid.status_code, lacking.status_code) == (401, 401, 403)
    assert lacking.json()["required"] == ["users:manage"]
    [audit] = _audits(full_logging)
    assert (audit.user_id, audit.status, audit.required) == (ALICE, 403, ["users:manage"])
    refusals = [r for r in full_logging.records if r.name == "ctxvars_mw"]
    assert [r.getMessage() for r in refusals] == [
        "request refused: 401 authentication_required",
        "request refused: 401 invalid_token",
    ]
    assert not any("tok-unknown" in line for line in full_logging.lines)


def test_filter_default_value_and_id_length_shape_the_fields() -> None:
    """Outside a request the fields hold ``default_value``; inside one, ``id_length`` shortens
    the request and correlation ids (the user id is never cut)."""
    import logging as stdlib_logging

    from ctxvars_mw import UserExecutionContext, use_context
    from ctxvars_mw.logging import ContextLogFilter

    def record() -> stdlib_logging.LogRecord:
        return stdlib_logging.LogRecord("t", stdlib_logging.INFO, __file__, 1, "m", None, None)

    outside = record()
    ContextLogFilter(default_value="").filter(outside)
    assert (outside.request_id, outside.user_id, outside.operation_depth) == ("", "", "")
    ctx = UserExecutionContext(user_id="auth0|5f7c8ec7c33c6c004bbafe82")
    inside = record()
    with use_context(ctx):
        ContextLogFilter(id_length=8).filter(inside)
    assert inside.request_id == ctx.request_id[:8]
    assert inside.correlation_id == ctx.correlation_id[:8]
    assert inside.user_id == ctx.user_id


@pytest.mark.parametrize(
    "options", [{"default_value": None}, {"id_length": 0}, {"id_length": True}]
)
def test_filter_refuses_bad_options(options: dict[str, object]) -> None:
    """A bad filter option is a ConfigurationError naming it, when logging is configured."""
    from ctxvars_mw import ConfigurationError
    from ctxvars_mw.logging import ContextLogFilter

    (name,) = options
    with pytest.raises(ConfigurationError, match=name):
        ContextLogFilter(**options)  # type: ignore[arg-type]


def test_filter_options_work_from_dictconfig() -> None:
    """``dictConfig`` passes the options next to ``"()"``."""
    import logging.config

    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "ctx": {"()": "ctxvars_mw.logging.ContextLogFilter", "default_value": "none"}
            },
            "handlers": {"h": {"class": "logging.NullHandler", "filters": ["ctx"]}},
            "loggers": {"ctxvars_mw.tests.dictconfig": {"handlers": ["h"]}},
        }
    )
    handler = logging.getLogger("ctxvars_mw.tests.dictconfig").handlers[0]
    (installed,) = handler.filters
    assert installed.default_value == "none"  # type: ignore[union-attr]
    logging.getLogger("ctxvars_mw.tests.dictconfig").handlers.clear()


def test_parent_request_id_is_the_parents_in_a_child_and_the_default_at_the_root() -> None:
    """A child's records carry its parent's request id, shortened by ``id_length`` like the
    other ids; a root context and no context at all give ``default_value``."""
    child = CTX.child("agent.plan")
    seen = {}
    for name, ctx in (("child", child), ("root", CTX), ("none", None)):
        record = _record()
        if ctx is None:
            ContextLogFilter(default_value="?", id_length=6).filter(record)
        else:
            with use_context(ctx):
                ContextLogFilter(default_value="?", id_length=6).filter(record)
        seen[name] = record.parent_request_id  # type: ignore[attr-defined]
    assert seen == {"child": CTX.request_id[:6], "root": "?", "none": "?"}


def test_record_factory_and_structlog_carry_the_parent_request_id(
    restore_factory: None,
) -> None:
    """The record factory puts ``parent_request_id`` on every record ("-" at the root); the
    structlog processor adds it as the id, or None at the root."""
    child = CTX.child("tool.search")
    install_record_factory()
    with use_context(child):
        inside = _record()
    with use_context(CTX):
        root = _record()
    assert inside.parent_request_id == CTX.request_id  # type: ignore[attr-defined]
    assert root.parent_request_id == "-"  # type: ignore[attr-defined]
    with use_context(child):
        event = structlog_processor(None, "info", {"event": "x"})
    with use_context(CTX):
        root_event = structlog_processor(None, "info", {"event": "x"})
    assert event["parent_request_id"] == CTX.request_id
    assert root_event["parent_request_id"] is None


# -- request metadata ----------------------------------------------------------------------

VISITED = CTX.replace(client_ip="203.0.113.7", user_agent="curl/8.5", method="GET", path="/r/1")


def test_the_filter_adds_request_metadata_only_when_asked() -> None:
    """By default records carry ids only; ``request_metadata`` adds the named fields, with
    ``default_value`` for a field the context does not hold and outside a request."""
    with use_context(VISITED):
        plain = _record()
        ContextLogFilter().filter(plain)
        chosen = _record()
        ContextLogFilter(request_metadata=["client_ip", "path"]).filter(chosen)
    assert not hasattr(plain, "client_ip")
    assert (chosen.client_ip, chosen.path) == ("203.0.113.7", "/r/1")  # type: ignore[attr-defined]
    assert not hasattr(chosen, "user_agent")
    with use_context(CTX):
        missing = _record()
        ContextLogFilter(request_metadata=["client_ip"], default_value="?").filter(missing)
    outside = _record()
    ContextLogFilter(request_metadata=["method"]).filter(outside)
    assert missing.client_ip == "?"  # type: ignore[attr-defined]
    assert outside.method == "-"  # type: ignore[attr-defined]


def test_the_filter_adds_metadata_to_records_the_factory_annotated(restore_factory: None) -> None:
    """A filter asking for metadata adds it even to a record that already has the ids."""
    install_record_factory()
    with use_context(VISITED):
        record = _record()
        ContextLogFilter(request_metadata=["user_agent"]).filter(record)
    assert record.user_agent == "curl/8.5"  # type: ignore[attr-defined]


def test_the_filter_takes_request_metadata_in_dict_config() -> None:
    """``request_metadata`` goes next to ``"()"`` in dictConfig, as a list."""
    buffer = io.StringIO()
    name = "ctxvars_mw.tests.metadata"
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "ctx": {
                    "()": "ctxvars_mw.logging.ContextLogFilter",
                    "request_metadata": ["client_ip", "method", "path"],
                }
            },
            "formatters": {"plain": {"format": "%(client_ip)s %(method)s %(path)s %(message)s"}},
            "handlers": {
                "buf": {
                    "class": "logging.StreamHandler",
                    "stream": buffer,
                    "filters": ["ctx"],
                    "formatter": "plain",
                }
            },
            "loggers": {name: {"handlers": ["buf"], "level": "INFO", "propagate": False}},
        }
    )
    try:
        with use_context(VISITED):
            logging.getLogger(name).info("served")
        logging.getLogger(name).info("idle")
    finally:
        logging.getLogger(name).handlers.clear()
    assert buffer.getvalue().splitlines() == ["203.0.113.7 GET /r/1 served", "- - - idle"]


@pytest.mark.parametrize("value", ["client_ip", ["client_ip", "referer"], [None]])
def test_an_unknown_request_metadata_name_is_a_configuration_error(value: Any) -> None:
    """The filter, the record factory and the structlog processor check the names once."""
    with pytest.raises(ConfigurationError):
        ContextLogFilter(request_metadata=value)
    with pytest.raises(ConfigurationError):
        install_record_factory(request_metadata=value)
    with pytest.raises(ConfigurationError):
        StructlogProcessor(request_metadata=value)


def test_the_record_factory_adds_the_metadata_it_was_asked_for(restore_factory: None) -> None:
    """``install_record_factory(request_metadata=...)`` puts the fields on every record; a
    later call changes which ones."""
    install_record_factory(request_metadata=["client_ip"])
    with use_context(VISITED):
        first = _record()
    install_record_factory(request_metadata=["path"])
    with use_context(VISITED):
        second = _record()
    outside = _record()
    assert first.client_ip == "203.0.113.7"  # type: ignore[attr-defined]
    assert not hasattr(first, "path")
    assert second.path == "/r/1"  # type: ignore[attr-defined]
    assert not hasattr(second, "client_ip")
    assert outside.path == "-"  # type: ignore[attr-defined]


def test_the_structlog_processor_adds_the_metadata_it_was_asked_for() -> None:
    """StructlogProcessor(request_metadata=...) adds the fields (None when absent); the
    default ``structlog_processor`` adds ids only; keys the event has are kept."""
    processor = StructlogProcessor(request_metadata=["client_ip", "user_agent"])
    with use_context(VISITED):
        event = processor(None, "info", {"event": "x", "user_agent": "mine"})
        ids_only = structlog_processor(None, "info", {"event": "x"})
    with use_context(CTX):
        bare = processor(None, "info", {"event": "x"})
    assert event["client_ip"] == "203.0.113.7"
    assert event["user_agent"] == "mine"
    assert event["request_id"] == VISITED.request_id
    assert "client_ip" not in ids_only
    assert bare["client_ip"] is None
    assert processor(None, "info", {"event": "y"}) == {"event": "y"}
