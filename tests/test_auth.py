"""Token verification: the standard-library check of plain tokens accepts exactly what PyJWT
accepts (every other token is PyJWT's to accept or refuse, with its reason)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqactor import auth
from seqactor.auth import AuthError, Identity, issue_token, verify_token

SECRET = b"k" * 32
NOW = int(time.time())  # for the generated claims (both checks see the same token at once)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _token(header: dict[str, Any], claims: dict[str, Any], key: bytes = SECRET,
           tamper: bool = False) -> str:
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    if tamper:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    return f"{head}.{body}.{_b64(sig)}"


def _outcome(token: str, secret: bytes = SECRET) -> Identity | str:
    try:
        return verify_token(secret, token)
    except AuthError as exc:
        return f"AuthError: {exc}"


def _outcome_pyjwt_only(token: str, monkeypatch: pytest.MonkeyPatch,
                        secret: bytes = SECRET) -> Identity | str:
    with monkeypatch.context() as m:
        m.setattr(auth, "_decode_plain", lambda *args: None)
        return _outcome(token, secret)


headers = st.one_of(
    st.just({"alg": "HS256", "typ": "JWT"}),
    st.just({"alg": "HS256"}),
    st.sampled_from([{"alg": "none"}, {"alg": "HS512", "typ": "JWT"}, {"alg": "RS256"},
                     {"alg": "HS256", "typ": "jwt"}, {"alg": "HS256", "kid": 7},
                     {"alg": "HS256", "kid": "a"}, {"alg": "HS256", "crit": ["x"]}]),
)
ints = st.integers(min_value=-(2**40), max_value=2**40)
times = st.one_of(st.sampled_from([NOW - 10, NOW + 3600, NOW + 10**9, 0]), ints,
                  st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=5),
                  st.none(), st.booleans())
claim_sets = st.fixed_dictionaries(
    {},
    optional={
        "sub": st.one_of(st.sampled_from(["alice", "", "a" * 200, "b\x00c"]), st.integers(),
                         st.none(), st.text(max_size=8)),
        "exp": times,
        "iat": times,
        "nbf": times,
        "role": st.sampled_from(["user", "service", "admin", 3]),
        "aud": st.just("x"),
        "extra": st.integers(),
    },
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(header=headers, claims=claim_sets, tamper=st.booleans(),
       key=st.sampled_from([SECRET, b"other-secret-0123456789abcdef012345"]))
def test_plain_check_accepts_exactly_what_pyjwt_accepts(
    header: dict[str, Any], claims: dict[str, Any], tamper: bool, key: bytes,
) -> None:
    token = _token(header, claims, key, tamper)
    with pytest.MonkeyPatch.context() as monkeypatch:
        assert _outcome(token) == _outcome_pyjwt_only(token, monkeypatch)


def _signed_plus(suffix: str) -> str:
    return _token({"alg": "HS256"}, {"sub": "u", "exp": int(time.time()) + 60}) + suffix


def _signed_body(raw: bytes) -> str:
    """A token signed with SECRET whose claims segment is ``raw``, byte for byte."""
    head = _b64(b'{"alg": "HS256"}')
    body = _b64(raw)
    sig = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(sig)}"


def _claims_json() -> str:
    return json.dumps({"sub": "u", "exp": int(time.time()) + 60})


def _signed_bad_segment() -> str:
    return _token({"alg": "HS256"}, {"sub": "u", "exp": int(time.time()) + 60}).replace(".", ".A", 1)


@pytest.mark.parametrize("make", [
    lambda: "", lambda: "a.b", lambda: "a.b.c.d", lambda: "!!.??.##",
    lambda: "eyJhbGciOiJIUzI1NiJ9.e30", lambda: "e30.e30.e30",
    lambda: _signed_plus("="),  # PyJWT takes a padded signature
    _signed_bad_segment,
    # claims that json.loads takes from bytes but a plain token never has, and broken ones
    lambda: _signed_body(f" {_claims_json()}\n".encode()),
    lambda: _signed_body(b"\xef\xbb\xbf" + _claims_json().encode()),  # UTF-8 BOM
    lambda: _signed_body(_claims_json().encode("utf-16")),
    lambda: _signed_body(_claims_json().encode() + b" {}"),
    lambda: _signed_body(b'{"sub": "\xff", "exp": 1}'),
    lambda: _signed_body(b"[1, 2]"),
    lambda: _signed_body(b""),
])
def test_malformed_tokens_get_pyjwts_answer(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    token = make()
    assert _outcome(token) == _outcome_pyjwt_only(token, monkeypatch)


def test_issued_tokens_take_the_plain_path_and_verify() -> None:
    token = issue_token(SECRET, "alice", role="service", ttl_s=60)
    assert auth._decode_plain(token, SECRET, time.time()) == jwt.decode(
        token, SECRET, algorithms=["HS256"])
    assert verify_token(SECRET, token) == Identity("alice", "service")
    expired = issue_token(SECRET, "bob", ttl_s=60, now=time.time() - 120)  # issued in the past
    assert _outcome(expired) == "AuthError: token expired"


@pytest.mark.parametrize("token, says", [
    ("abc", "not a JWT"),
    ("a.b.c", "not a JWT"),
    ("", "missing token"),
    (None, "signature does not match"),  # a well-formed token signed with another secret
])
def test_a_refused_token_says_what_is_wrong_in_plain_words(token: str | None, says: str) -> None:
    secret = b"s" * 32
    if token is None:
        token = issue_token(b"o" * 32, "alice")
    with pytest.raises(AuthError) as err:
        verify_token(secret, token)
    assert says in str(err.value)
    assert "segments" not in str(err.value)  # not PyJWT's internal wording
