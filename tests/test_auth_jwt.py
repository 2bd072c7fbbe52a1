"""JWTAuthenticator: algorithm families, key loading, claims, the verified-token cache."""

from __future__ import annotations

import base64
import inspect
import time
from typing import Any

import jwt
import jwt.exceptions
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ctxvars_mw import (
    ConfigurationError,
    ExpiredTokenError,
    IdRules,
    InvalidTokenError,
    JWTAuthenticator,
    Tier,
    use_id_rules,
)
from ctxvars_mw.auth import jose
from ctxvars_mw.auth.jwt import from_pyjwt_error
from tests.auth_helpers import (
    AUDIENCE,
    ISSUER,
    SECRET,
    USER,
    claims,
    dumps,
    ec_key,
    ed_key,
    forge,
    public_jwk,
    rsa_key,
    sign,
)


def _pem(private_key: Any) -> bytes:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class Clock:
    """A settable Unix clock."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


FAMILIES = [
    ("HS256", lambda: SECRET, lambda: SECRET),
    ("HS384", lambda: SECRET * 2, lambda: SECRET * 2),
    ("HS512", lambda: SECRET * 2, lambda: SECRET * 2),
    ("RS256", rsa_key, lambda: _pem(rsa_key())),
    ("RS512", rsa_key, lambda: rsa_key().public_key()),
    ("PS256", rsa_key, lambda: _pem(rsa_key()).decode()),
    ("PS384", rsa_key, lambda: public_jwk(rsa_key(), "r1", "PS384")),
    ("ES256", lambda: ec_key("P-256"), lambda: _pem(ec_key("P-256"))),
    ("ES384", lambda: ec_key("P-384"), lambda: ec_key("P-384").public_key()),
    ("ES512", lambda: ec_key("P-521"), lambda: public_jwk(ec_key("P-521"), "e1", "ES512")),
    ("EdDSA", ed_key, lambda: _pem(ed_key())),
]


@pytest.mark.parametrize(("alg", "signing", "verifying"), FAMILIES, ids=[f[0] for f in FAMILIES])
async def test_each_algorithm_family_verifies_with_real_keys(
    alg: str, signing: Any, verifying: Any
) -> None:
    """HS*, RS*, PS*, ES* and EdDSA tokens verify with PEM, key-object and JWK keys."""
    auth = JWTAuthenticator(key=verifying(), algorithms=[alg], issuer=ISSUER, audience=AUDIENCE)
    identity = await auth.verify(sign(claims(), signing(), alg))
    assert identity.user_id == USER
    assert identity.auth_method == "jwt"
    other = JWTAuthenticator(key=verifying(), algorithms=[alg], audience=AUDIENCE)
    with pytest.raises(InvalidTokenError):  # an issuer-less authenticator still checks aud
        await other.verify(sign(claims(aud="someone-else"), signing(), alg))


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_verification_keeps_its_keyed_state_unchanged(alg: str) -> None:
    """The secret is absorbed once and copied per token: many tokens keep verifying, and a
    flipped signature bit or another secret of the same length is still refused."""
    secret = SECRET * 2
    auth = JWTAuthenticator(key=secret, algorithms=[alg], audience=AUDIENCE, cache_size=0)
    for i in range(3):
        assert (await auth.verify(sign(claims(jti=f"t{i}"), secret, alg))).user_id == USER
    token = sign(claims(), secret, alg)
    head, body, signature = token.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)))
    raw[0] ^= 1
    flipped = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    other_secret = bytes(b ^ 0xFF for b in secret)
    for bad in (f"{head}.{body}.{flipped}", sign(claims(), other_secret, alg)):
        with pytest.raises(InvalidTokenError):
            await auth.verify(bad)
    assert (await auth.verify(token)).user_id == USER


async def test_decoded_headers_are_remembered_only_when_valid_and_in_bounds() -> None:
    """Tokens share a header segment; a refused header is refused every time; the memo of
    decoded headers stays bounded under a stream of made-up ones."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, cache_size=0)
    first, second = sign(claims(jti="a")), sign(claims(jti="b"))
    assert first.split(".")[0] == second.split(".")[0]
    assert (await auth.verify(first)).user_id == USER
    assert (await auth.verify(second)).user_id == USER
    repeated = forge('{"alg":"HS256","alg":"HS256","typ":"JWT"}', dumps(claims()))
    for _ in range(2):
        with pytest.raises(InvalidTokenError, match="repeats"):
            await auth.verify(repeated)
    for i in range(jose._HEADERS_MAX + 50):
        made_up = forge(dumps({"alg": "HS256", "kid": f"k{i}"}), dumps(claims()))
        assert (await auth.verify(made_up)).user_id == USER
    assert len(jose._headers) <= jose._HEADERS_MAX


async def test_claims_are_mapped_to_the_identity() -> None:
    """user id, tier, roles, permissions, scopes (string or list), sid and claims are kept."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    payload = claims(
        tier="enterprise",
        roles=["admin", "user"],
        permissions=["reports:export"],
        scope="a:read  b:write",
        sid="s3ss10n-abcdefghijklmnopqrstu",
    )
    identity = await auth.verify(sign(payload))
    assert identity.tier is Tier.ENTERPRISE
    assert identity.roles == {"admin", "user"}
    assert identity.permissions == {"reports:export"}
    assert identity.scopes == {"a:read", "b:write"}
    assert identity.session_id == "s3ss10n-abcdefghijklmnopqrstu"
    assert identity.claims["roles"] == ("admin", "user")
    assert identity.expires_at == payload["exp"]
    listed = await auth.verify(sign(claims(scope=["x:read", "y:read"])))
    assert listed.scopes == {"x:read", "y:read"}


async def test_custom_claim_names_are_used() -> None:
    """user_id_claim, tier_claim, roles_claim, scope_claim and session_claim are honoured."""
    auth = JWTAuthenticator(
        key=SECRET,
        algorithms=["HS256"],
        required_claims=("exp", "uid"),
        user_id_claim="uid",
        tier_claim="plan",
        roles_claim="groups",
        scope_claim="scp",
        session_claim="session",
    )
    token = sign(
        claims(
            aud=None,
            iss=None,
            uid="user_2hNqYf3kT9xWzL",
            plan="early",
            groups=["user"],
            scp=["s:1"],
            session="sess-0123456789abcdefghij",
        )
    )
    identity = await auth.verify(token)
    assert (identity.user_id, identity.tier, identity.roles) == (
        "user_2hNqYf3kT9xWzL",
        Tier.EARLY,
        {"user"},
    )
    assert identity.scopes == {"s:1"}
    assert identity.session_id == "sess-0123456789abcdefghij"


async def test_leeway_accepts_slightly_expired_and_refuses_beyond() -> None:
    """exp within the leeway passes; past it is ExpiredTokenError; iat/nbf likewise bounded."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, leeway=30)
    now = int(time.time())
    assert (await auth.verify(sign(claims(exp=now - 10)))).user_id == USER
    with pytest.raises(ExpiredTokenError):
        await auth.verify(sign(claims(exp=now - 60)))
    assert (await auth.verify(sign(claims(iat=now + 10, nbf=now + 10)))).user_id == USER
    with pytest.raises(InvalidTokenError, match="future"):
        await auth.verify(sign(claims(iat=now + 120)))


async def test_audience_list_must_contain_ours_and_issuer_must_match() -> None:
    """An aud list with ours passes; issuer may be a collection of accepted issuers."""
    auth = JWTAuthenticator(
        key=SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=[ISSUER, "https://b.test"]
    )
    assert await auth.verify(sign(claims(aud=["other", AUDIENCE])))
    assert await auth.verify(sign(claims(iss="https://b.test")))
    with pytest.raises(InvalidTokenError, match="issuer"):
        await auth.verify(sign(claims(iss=None)))
    with pytest.raises(InvalidTokenError, match="audience"):
        await auth.verify(sign(claims(aud=None)))
    with pytest.raises(InvalidTokenError, match="audience"):
        await auth.verify(sign(claims(aud=[AUDIENCE, 3])))


async def test_a_token_with_an_audience_is_refused_when_none_is_configured() -> None:
    """Like PyJWT: a token meant for some audience is not accepted by a service with none."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"])
    with pytest.raises(InvalidTokenError, match="audience"):
        await auth.verify(sign(claims()))
    assert await auth.verify(sign(claims(aud=None)))


async def test_placeholder_subject_follows_the_current_id_rules() -> None:
    """A subject refused by the default rules passes under rules that allow it."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, cache_size=0)
    token = sign(claims(sub="demo"))
    with pytest.raises(InvalidTokenError, match="subject"):
        await auth.verify(token)
    with use_id_rules(IdRules.default().allowing("demo")):
        assert (await auth.verify(token)).user_id == "demo"


async def test_required_typ_accepts_media_type_forms() -> None:
    """required_typ compares case-insensitively and allows the application/ prefix."""
    auth = JWTAuthenticator(
        key=SECRET, algorithms=["HS256"], audience=AUDIENCE, required_typ="at+jwt"
    )
    for typ in ("at+jwt", "AT+JWT", "application/at+jwt"):
        assert await auth.verify(sign(claims(), typ=typ))
    with pytest.raises(InvalidTokenError, match="type"):
        await auth.verify(sign(claims(), typ="JWT"))


async def test_repeated_members_are_refused_even_when_pyjwt_would_accept() -> None:
    """A repeated payload member is refused although PyJWT keeps the last one silently."""
    payload = dumps(claims())[:-1] + f',"sub":"{USER}"}}'
    token = forge(dumps({"alg": "HS256"}), payload)
    assert jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE)["sub"] == USER
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE)
    with pytest.raises(InvalidTokenError, match="repeats"):
        await auth.verify(token)


async def test_max_token_bytes_is_enforced() -> None:
    """A token longer than max_token_bytes is refused before any parsing."""
    auth = JWTAuthenticator(
        key=SECRET, algorithms=["HS256"], audience=AUDIENCE, max_token_bytes=512
    )
    assert await auth.verify(sign(claims(pad="a" * 100)))
    with pytest.raises(InvalidTokenError, match="too large"):
        await auth.verify(sign(claims(pad="a" * 600)))


async def test_verified_tokens_are_cached_until_exp() -> None:
    """A cached token returns the same identity, and stops being served at its exp."""
    clock = Clock()
    auth = JWTAuthenticator(
        key=SECRET, algorithms=["HS256"], audience=AUDIENCE, leeway=30, clock=clock
    )
    token = sign(claims(exp=int(clock.now) + 60))
    first = await auth.verify(token)
    assert await auth.verify(token) is first
    clock.now += 61  # past exp, still inside the leeway: re-verified, not served from cache
    again = await auth.verify(token)
    assert again is not first
    assert again == first
    clock.now += 60  # past exp + leeway
    with pytest.raises(ExpiredTokenError):
        await auth.verify(token)


async def test_cache_is_bounded_and_failures_are_not_cached() -> None:
    """The cache holds at most cache_size tokens; refused tokens are never remembered."""
    auth = JWTAuthenticator(key=SECRET, algorithms=["HS256"], audience=AUDIENCE, cache_size=2)
    tokens = [sign(claims(jti=f"t{i}")) for i in range(3)]
    identities = [await auth.verify(t) for t in tokens]
    assert await auth.verify(tokens[2]) is identities[2]
    assert await auth.verify(tokens[0]) is not identities[0]  # evicted (least recent)
    bad = sign(claims(exp=int(time.time()) - 600))
    for _ in range(2):
        with pytest.raises(ExpiredTokenError):
            await auth.verify(bad)
    assert len(auth._cache) == 2


async def test_tokens_without_exp_are_not_cached() -> None:
    """With exp not required, a token without exp verifies but is never cached."""
    auth = JWTAuthenticator(
        key=SECRET, algorithms=["HS256"], audience=AUDIENCE, required_claims=("sub",)
    )
    token = sign(claims(exp=None))
    assert await auth.verify(token) is not await auth.verify(token)


def _pyjwt_exception_classes() -> list[type[Exception]]:
    return [
        cls
        for _, cls in inspect.getmembers(jwt.exceptions, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__ == "jwt.exceptions"
    ]


@pytest.mark.parametrize("cls", _pyjwt_exception_classes(), ids=lambda c: c.__name__)
def test_every_pyjwt_exception_maps_to_an_invalid_token_error(cls: type[Exception]) -> None:
    """Every class in jwt.exceptions becomes InvalidTokenError (ExpiredTokenError for exp)."""
    error = from_pyjwt_error(cls("detail that must not leak"))
    assert isinstance(error, InvalidTokenError)
    assert isinstance(error, ExpiredTokenError) == issubclass(cls, jwt.ExpiredSignatureError)
    assert "detail" not in error.description
    assert error.status_code == 401


def test_pyjwt_exception_list_is_complete() -> None:
    """The mapping test above covers PyJWT's whole exception module (19 in 2.15)."""
    assert len(_pyjwt_exception_classes()) >= 19


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"key": SECRET, "algorithms": []}, "at least one"),
        ({"key": SECRET, "algorithms": "HS256"}, "list"),
        ({"key": SECRET, "algorithms": ["none"]}, "never 'none'"),
        ({"key": SECRET, "algorithms": ["HS256", "RS256"]}, "mixed"),
        ({"algorithms": ["HS256"]}, "exactly one"),
        (
            {"key": SECRET, "jwks_url": "https://a.test/jwks", "algorithms": ["HS256"]},
            "exactly one",
        ),
        ({"key": b"short-secret", "algorithms": ["HS256"]}, "too weak"),
        ({"key": SECRET, "algorithms": ["HS512"]}, "too weak"),
        ({"key": _pem(rsa_key()), "algorithms": ["HS256"]}, "cannot verify HS256"),
        ({"key": rsa_key(), "algorithms": ["RS256"]}, "public key"),
        ({"key": SECRET, "algorithms": ["RS256"]}, "cannot verify RS256"),
        ({"key": _pem(ec_key("P-256")), "algorithms": ["ES384"]}, "cannot verify ES384"),
        ({"jwks_url": "http://issuer.test/jwks", "algorithms": ["RS256"]}, "https"),
        ({"jwks_url": "ftp://issuer.test/jwks", "algorithms": ["RS256"]}, "https"),
        ({"jwks_url": "https://issuer.test/jwks", "algorithms": ["HS256"]}, "HS"),
        ({"key": SECRET, "algorithms": ["HS256"], "leeway": -1}, "leeway"),
        ({"key": SECRET, "algorithms": ["HS256"], "cache_size": -1}, "cache_size"),
        ({"key": SECRET, "algorithms": ["HS256"], "required_claims": "exp"}, "collection"),
        ({"key": SECRET, "algorithms": ["HS256"], "roles_claim": ""}, "roles_claim"),
        ({"key": SECRET, "algorithms": ["HS256"], "audience": []}, "audience"),
        ({"key": SECRET, "algorithms": ["HS256"], "required_typ": ""}, "required_typ"),
    ],
)
def test_bad_options_raise_configuration_error(options: dict[str, Any], match: str) -> None:
    """Misconfiguration is caught at construction with a ConfigurationError."""
    with pytest.raises(ConfigurationError, match=match):
        JWTAuthenticator(**options)


def test_weak_rsa_keys_are_refused() -> None:
    """An RSA key under 2048 bits is refused."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigurationError, match="too weak"):
        JWTAuthenticator(key=weak.public_key(), algorithms=["RS256"])


def test_loopback_jwks_url_may_use_http() -> None:
    """Plain http is allowed for loopback hosts only."""
    for host in ("127.0.0.1", "localhost", "[::1]"):
        JWTAuthenticator(jwks_url=f"http://{host}:8080/jwks", algorithms=["RS256"])


_ORDERS = {
    "ES256": ("P-256", 32),
    "ES384": ("P-384", 48),
    "ES512": ("P-521", 66),
}


def _twin(token: str, alg: str) -> tuple[str, bool]:
    """The n - s twin of an ES* token and whether the twin is the high-S one."""
    from ctxvars_mw.auth.keys import _CURVE_ORDERS

    signing_input, _, signature_b64 = token.rpartition(".")
    signature = base64.urlsafe_b64decode(signature_b64 + "==")
    size = _ORDERS[alg][1]
    order = _CURVE_ORDERS[alg]
    s = int.from_bytes(signature[size:], "big")
    twin = signature[:size] + (order - s).to_bytes(size, "big")
    encoded = base64.urlsafe_b64encode(twin).rstrip(b"=").decode()
    return f"{signing_input}.{encoded}", order - s > order // 2


def _token_with_s(alg: str, high: bool, **extra: Any) -> tuple[str, str]:
    """A real token whose signature has a high (or low) s, and its twin."""
    for i in range(64):
        token = sign(claims(jti=f"s{i}", **extra), ec_key(_ORDERS[alg][0]), alg)
        twin, twin_is_high = _twin(token, alg)
        if twin_is_high != high:
            return token, twin
    raise AssertionError("no signature of the wanted kind in 64 tries")


@pytest.mark.parametrize("alg", sorted(_ORDERS))
def test_the_n_minus_s_twin_of_a_real_token_is_a_valid_ecdsa_signature(alg: str) -> None:
    """ECDSA itself accepts both spellings (which is why they must be told apart), and the
    curve orders used to spell the twin are right."""
    token, twin = _token_with_s(alg, high=False)
    public = ec_key(_ORDERS[alg][0]).public_key()
    assert jwt.decode(twin, public, algorithms=[alg], audience=AUDIENCE)["sub"] == USER
    assert twin != token


@pytest.mark.parametrize("alg", sorted(_ORDERS))
async def test_require_low_s_refuses_the_high_s_twin(alg: str) -> None:
    """With require_low_s, the forged high-S twin of a real low-S token is a 401, and a
    token the signer gave a high s is refused as well."""
    public = ec_key(_ORDERS[alg][0]).public_key()
    auth = JWTAuthenticator(key=public, algorithms=[alg], audience=AUDIENCE, require_low_s=True)
    token, twin = _token_with_s(alg, high=False)
    assert (await auth.verify(token)).user_id == USER
    with pytest.raises(InvalidTokenError, match="low-S"):
        await auth.verify(twin)
    high, _ = _token_with_s(alg, high=True)
    with pytest.raises(InvalidTokenError, match="low-S"):
        await auth.verify(high)


async def test_both_spellings_of_an_es256_token_are_one_cached_token() -> None:
    """By default the twin of a token is the same token: one verification, one identity,
    and canonical_token gives both the low-S spelling to key a deny list on."""
    public = ec_key().public_key()
    auth = JWTAuthenticator(key=public, algorithms=["ES256"], audience=AUDIENCE)
    high, low = _token_with_s("ES256", high=True)
    first = await auth.verify(high)
    assert await auth.verify(low) is first  # answered from the entry of its twin
    assert await auth.verify(high) is first
    assert JWTAuthenticator.canonical_token(high) == JWTAuthenticator.canonical_token(low) == low
    assert JWTAuthenticator.canonical_token("not.a.token!") == "not.a.token!"
    rs = sign(claims(), rsa_key(), "RS256")
    assert JWTAuthenticator.canonical_token(rs) == rs
    auth.clear_cache()
    assert len(auth._cache) == 0
    assert (await auth.verify(low)).user_id == USER


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"require_low_s": "yes"}, "require_low_s"),
        ({"roles_claim": "https://example.com/roles"}, "brackets"),
        ({"roles_claim": "realm_access..roles"}, "claim path"),
        ({"roles_claim": []}, "at least one"),
        ({"tier_map": {"gold": "platinum"}}, "tier"),
        ({"tier_map": ["gold"]}, "tier_map"),
        ({"claims_mapper": "not callable"}, "callable"),
    ],
)
def test_bad_mapping_options_raise_configuration_error(options: dict[str, Any], match: str) -> None:
    """Claim paths, tier maps and the hook are checked at construction."""
    with pytest.raises(ConfigurationError, match=match):
        JWTAuthenticator(key=SECRET, algorithms=["HS256"], **options)
