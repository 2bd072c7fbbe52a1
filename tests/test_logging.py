"""Logging: ContextLogFilter, the chained record factory, the structlog processor, dictConfig."""

from __future__ import annotations

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

from ctxvars_mw import ContextThreadPoolExecutor, Tier, UserExecutionContext, use_context
from ctxvars_mw.logging import (
    ContextLogFilter,
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
