"""The error tree of API.md §6 (ctxvars_mw.errors)."""

from __future__ import annotations

import pytest

import ctxvars_mw.errors as errors
from ctxvars_mw import (
    AuthenticationError,
    AuthenticationRequiredError,
    ConfigurationError,
    ContextNotSetError,
    CtxvarsError,
    ExpiredTokenError,
    InvalidContextError,
    InvalidRequestError,
    InvalidTokenError,
    MaxDepthExceededError,
    PermissionDeniedError,
    PermissionEscalationError,
    ServiceUnavailableError,
)

PARENTS: list[tuple[type[Exception], tuple[type[BaseException], ...]]] = [
    (ConfigurationError, (CtxvarsError, ValueError)),
    (InvalidContextError, (CtxvarsError, ValueError)),
    (MaxDepthExceededError, (InvalidContextError, CtxvarsError, ValueError)),
    (ContextNotSetError, (CtxvarsError, LookupError)),
    (AuthenticationError, (CtxvarsError,)),
    (AuthenticationRequiredError, (AuthenticationError, CtxvarsError)),
    (InvalidTokenError, (AuthenticationError, CtxvarsError)),
    (ExpiredTokenError, (InvalidTokenError, AuthenticationError, CtxvarsError)),
    (PermissionDeniedError, (CtxvarsError,)),
    (PermissionEscalationError, (PermissionDeniedError, CtxvarsError)),
    (InvalidRequestError, (CtxvarsError,)),
    (ServiceUnavailableError, (CtxvarsError,)),
]


@pytest.mark.parametrize(("cls", "parents"), PARENTS)
def test_error_tree(cls: type[Exception], parents: tuple[type[BaseException], ...]) -> None:
    """Each error subclasses its documented parents (builtins included)."""
    for parent in parents:
        assert issubclass(cls, parent), parent
    assert issubclass(cls, Exception)


def test_branches_do_not_cross() -> None:
    """401, 403 and validation errors are distinct branches."""
    assert not issubclass(AuthenticationError, PermissionDeniedError)
    assert not issubclass(PermissionDeniedError, AuthenticationError)
    assert not issubclass(AuthenticationError, ValueError)
    assert not issubclass(PermissionDeniedError, PermissionError)
    assert not issubclass(ContextNotSetError, ValueError)
    assert not issubclass(InvalidContextError, ConfigurationError)


def test_every_exported_error_is_in_the_tree() -> None:
    """Everything errors.__all__ names is a CtxvarsError, and is drawn in the docstring."""
    assert errors.__doc__ is not None
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, CtxvarsError)
        assert name in errors.__doc__
        assert cls.__doc__


def test_no_error_shadows_a_builtin() -> None:
    """No error is named like a builtin exception."""
    import builtins

    assert not set(errors.__all__) & set(dir(builtins))


@pytest.mark.parametrize(
    ("cls", "status", "code"),
    [
        (AuthenticationError, 401, "invalid_token"),
        (AuthenticationRequiredError, 401, "authentication_required"),
        (InvalidTokenError, 401, "invalid_token"),
        (ExpiredTokenError, 401, "invalid_token"),
        (PermissionDeniedError, 403, "insufficient_scope"),
        (PermissionEscalationError, 403, "insufficient_scope"),
        (InvalidRequestError, 400, "invalid_request"),
        (ServiceUnavailableError, 503, "temporarily_unavailable"),
    ],
)
def test_http_errors_carry_status_code_and_error(
    cls: type[errors.HTTPError], status: int, code: str
) -> None:
    """Each HTTP-facing error has its status code, an OAuth error code and a description."""
    exc = cls()
    assert exc.status_code == status
    assert exc.error == code
    assert exc.description
    assert str(exc) == exc.description
    assert cls("Custom text.").description == "Custom text."


def test_permission_denied_names_what_was_required() -> None:
    """PermissionDeniedError keeps `required` as a tuple, keyword-only."""
    exc = PermissionDeniedError("No.", required=["a:b", "c:d"])
    assert exc.required == ("a:b", "c:d")
    assert PermissionDeniedError().required == ()
    with pytest.raises(TypeError):
        PermissionDeniedError("No.", ["a:b"])  # type: ignore[misc]


def test_service_unavailable_carries_retry_after() -> None:
    """ServiceUnavailableError has a retry_after in seconds."""
    assert ServiceUnavailableError(retry_after=7).retry_after == 7
    assert ServiceUnavailableError().retry_after == 5


def test_existing_except_blocks_keep_working() -> None:
    """Code catching builtins catches ours."""
    with pytest.raises(LookupError):
        raise ContextNotSetError("none")
    with pytest.raises(ValueError):
        raise MaxDepthExceededError("deep")


def test_every_http_error_shares_the_public_base() -> None:
    """One handler for HTTPError answers every HTTP-facing error, with its status code."""
    from ctxvars_mw import HTTPError

    for cls in (
        AuthenticationError,
        AuthenticationRequiredError,
        InvalidTokenError,
        ExpiredTokenError,
        PermissionDeniedError,
        PermissionEscalationError,
        InvalidRequestError,
        ServiceUnavailableError,
    ):
        assert issubclass(cls, HTTPError)
        assert cls().status_code in (400, 401, 403, 503)
    for cls in (ConfigurationError, InvalidContextError, ContextNotSetError):
        assert not issubclass(cls, HTTPError)
