"""Kubernetes workload identity: projected service-account tokens (JWTs) as agent credentials.

Tokens are signed by test keys whose JWKS a real HTTP server on 127.0.0.1 serves; the service
fetches it (KMS_JWT_JWKS_URL). Each bad token must be a 401 whose denial is audited with its reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kms_service.auth.identities import JwksCache, parse_jwks
from kms_service.settings import Settings
from tests.conftest import Api
from tests.jwtutil import (
    JwksServer,
    ec_jwk,
    hs256_with_public_key,
    rsa_jwk,
    sign,
    tamper_payload,
    unsigned,
)

ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "kms.kms.svc"
SA = "system:serviceaccount:storage:csi-node"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def jwks_server(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> Iterator[JwksServer]:
    server = JwksServer()
    server.jwks = {"keys": [rsa_jwk(rsa_key, "rsa-1"), ec_jwk(ec_key, "ec-1")]}
    with server.running():
        yield server


@pytest.fixture
def settings(db_url: str, tmp_path: Path, jwks_server: JwksServer) -> Settings:
    """Overrides conftest's: the same, plus workload identity."""
    subjects = tmp_path / "subjects.json"
    subjects.write_text(
        json.dumps(
            [
                {"subject": SA, "tenant": "acme", "keys": ["volumes"], "operations": ["derive"]},
                {"subject": "system:serviceaccount:team-b:*", "tenant": "beta", "description": "all of b"},
            ]
        )
    )
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        change_poll_interval_seconds=0.05,
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        jwt_jwks_url=jwks_server.url,
        jwt_subjects_file=subjects,
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": [AUDIENCE, "https://kubernetes.default.svc"],
        "sub": SA,
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "kubernetes.io": {"namespace": "storage", "serviceaccount": {"name": "csi-node"}},
    }
    return {k: v for k, v in (base | overrides).items() if v is not None}


RS = {"alg": "RS256", "typ": "JWT", "kid": "rsa-1"}


async def setup(api: Api) -> None:
    await api.tenant_and_key("acme", "volumes")
    r = await api.post("/v1/tenants/acme/keys", {"name": "other", "provider": {"type": "local"}})
    assert r.status_code == 201, r.text
    await api.tenant_and_key("beta", "volumes")


async def derive(api: Api, token: str, tenant: str = "acme", key: str = "volumes", op: str = "derive") -> int:
    body: dict[str, Any] = {"id": "vol-1"} if op == "derive" else {"plaintext": "aGk="}
    r = await api.post(f"/v1/tenants/{tenant}/keys/{key}/{op}", body, token=token)
    return r.status_code


async def denials(api: Api) -> list[dict[str, Any]]:
    r = await api.get("/v1/audit?action=auth.denied&limit=1000")
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["events"]
    return events


async def test_a_valid_service_account_token_derives_within_its_mapped_scope(
    api: Api, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    await setup(api)
    token = sign(rsa_key, RS, claims())
    r = await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "vol-1"}, token=token)
    assert r.status_code == 200, r.text
    assert len(r.json()["key"]) == 44
    # Outside the mapped scope: as if it did not exist.
    assert await derive(api, token, key="other") == 404
    assert await derive(api, token, tenant="beta") == 404
    assert await derive(api, token, op="encrypt") == 404
    # The namespace wildcard, and ES256.
    team_b = sign(ec_key, {"alg": "ES256", "kid": "ec-1"}, claims(sub="system:serviceaccount:team-b:app"))
    assert await derive(api, team_b, tenant="beta") == 200
    assert await derive(api, team_b, tenant="acme") == 404
    # A string audience works as well as a list.
    assert await derive(api, sign(rsa_key, RS, claims(aud=AUDIENCE))) == 200
    # The audit names the service account.
    r = await api.get("/v1/audit?action=key.dek.derived&limit=1000")
    actors = {e["actor"]["id"] for e in r.json()["events"]}
    assert {"sa:storage/csi-node", "sa:team-b/app"} <= actors
    denied = {(e["actor"]["id"], e["details"]["reason"]) for e in await denials(api)}
    assert ("sa:storage/csi-node", "out_of_scope") in denied


def _bad_tokens(rsa_key: rsa.RSAPrivateKey) -> dict[str, tuple[str, str]]:
    now = int(time.time())
    good = sign(rsa_key, RS, claims())
    return {
        "expired": (sign(rsa_key, RS, claims(exp=now - 300, iat=now - 900, nbf=now - 900)), "jwt_expired"),
        "not yet valid": (sign(rsa_key, RS, claims(nbf=now + 600, exp=now + 1200)), "jwt_not_yet_valid"),
        "no exp": (sign(rsa_key, RS, claims(exp=None)), "jwt_malformed"),
        "wrong audience": (sign(rsa_key, RS, claims(aud="someone-else")), "jwt_bad_audience"),
        "no audience": (sign(rsa_key, RS, claims(aud=None)), "jwt_bad_audience"),
        "wrong issuer": (sign(rsa_key, RS, claims(iss="https://evil.example")), "jwt_bad_issuer"),
        "unknown kid": (sign(rsa_key, RS | {"kid": "nope"}, claims()), "jwt_unknown_kid"),
        "tampered payload": (
            tamper_payload(good, claims(sub="system:serviceaccount:team-b:app")),
            "jwt_bad_signature",
        ),
        "alg none": (unsigned({"alg": "none", "kid": "rsa-1"}, claims()), "jwt_bad_alg"),
        "HS256 keyed with the public key": (hs256_with_public_key(rsa_key, "rsa-1", claims()), "jwt_bad_alg"),
        "RS256 header on the EC key": (sign(rsa_key, RS | {"kid": "ec-1"}, claims()), "jwt_bad_alg"),
        "other key, right kid": (
            sign(rsa.generate_private_key(public_exponent=65537, key_size=2048), RS, claims()),
            "jwt_bad_signature",
        ),
        "unmapped subject": (
            sign(rsa_key, RS, claims(sub="system:serviceaccount:storage:other")),
            "jwt_unknown_subject",
        ),
        "not a service account": (sign(rsa_key, RS, claims(sub="alice")), "jwt_unknown_subject"),
        "crit header": (sign(rsa_key, RS | {"crit": ["exp"]}, claims()), "jwt_bad_header"),
    }


async def test_bad_tokens_are_401_and_each_denial_is_audited_with_its_reason(
    api: Api, rsa_key: rsa.RSAPrivateKey
) -> None:
    await setup(api)
    for name, (token, reason) in _bad_tokens(rsa_key).items():
        before = len(await denials(api))
        r = await api.post("/v1/tenants/acme/keys/volumes/derive", {"id": "vol-1"}, token=token)
        assert r.status_code == 401, (name, r.text)
        assert r.json()["code"] == "unauthenticated"
        assert token not in r.text and token.split(".")[1] not in r.text
        new = (await denials(api))[before:]
        assert [e["details"]["reason"] for e in new] == [reason], name
        assert token not in json.dumps(new)
    # And the good one still works (the denials above were about the tokens, not the service).
    assert await derive(api, sign(rsa_key, RS, claims())) == 200


async def test_unknown_kids_cannot_make_the_service_hammer_the_jwks(
    api: Api, rsa_key: rsa.RSAPrivateKey, jwks_server: JwksServer
) -> None:
    await setup(api)
    assert await derive(api, sign(rsa_key, RS, claims())) == 200
    hits = jwks_server.hits
    for i in range(20):
        assert await derive(api, sign(rsa_key, RS | {"kid": f"made-up-{i}"}, claims())) == 401
    assert jwks_server.hits <= hits + 1


async def test_kms_tokens_still_work_next_to_jwts(api: Api) -> None:
    await setup(api)
    token = await api.agent_token("acme", keys=["volumes"])
    assert token.startswith("kms_")
    assert await derive(api, token) == 200
    r = await api.http.post(
        "/v1/tenants/acme/keys/volumes/derive", json={"id": "v"}, headers={"Authorization": "Bearer a.b"}
    )
    assert r.status_code == 401


# -- the JWKS cache on its own (a fake clock, a fake fetch) ----------------------------------------


class FakeJwks:
    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.calls = 0
        self.fail = False

    async def __call__(self) -> Any:
        self.calls += 1
        if self.fail:
            raise OSError("down")
        return self.jwks


async def test_jwks_cache_refetches_unknown_kids_at_a_limited_rate_and_refreshes_after_its_ttl(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    now = [1000.0]
    fetch = FakeJwks({"keys": [rsa_jwk(rsa_key, "a")]})
    cache = JwksCache(fetch, ttl=300, min_refetch=10, clock=lambda: now[0])
    assert await cache.key("a") is not None and fetch.calls == 1
    assert await cache.key("a") is not None and fetch.calls == 1  # cached
    fetch.jwks = {"keys": [rsa_jwk(rsa_key, "a"), ec_jwk(ec_key, "b")]}  # rotation
    assert await cache.key("b") is None and fetch.calls == 1  # too soon after the last fetch
    now[0] += 10
    assert await cache.key("b") is not None and fetch.calls == 2  # unknown kid: refetched
    assert await cache.key("zzz") is None and fetch.calls == 2
    fetch.jwks = {"keys": [ec_jwk(ec_key, "b")]}  # "a" retired
    now[0] += 299
    assert await cache.key("a") is not None and fetch.calls == 2  # within the TTL
    now[0] += 1
    assert await cache.key("a") is None and fetch.calls == 3  # TTL over: refreshed, "a" gone
    fetch.fail = True
    now[0] += 301
    assert await cache.key("b") is not None and fetch.calls == 4  # an outage keeps the last keys


def test_parse_jwks_keeps_only_usable_signing_keys(
    rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    keys = parse_jwks(
        {
            "keys": [
                rsa_jwk(rsa_key, "ok"),
                rsa_jwk(small, "small"),
                rsa_jwk(rsa_key, "enc") | {"use": "enc"},
                rsa_jwk(rsa_key, "ps") | {"alg": "PS256"},
                ec_jwk(ec_key, "ec") | {"crv": "P-384"},
                {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                "junk",
            ]
        }
    )
    assert set(keys) == {"ok"}


# -- the mapping files and the settings checks -----------------------------------------------------


def test_subjects_and_principals_files_are_validated_at_start(
    tmp_path: Path, jwks_server: JwksServer
) -> None:
    from kms_service.auth.identities import CertPrincipals, IdentityConfigError, load_identities

    toml = tmp_path / "principals.toml"
    toml.write_text(
        '[[principals]]\nsan = "agent.example"\ntenant = "acme"\noperations = ["derive"]\n'
        '[[principals]]\nspki_sha256 = "' + "ab" * 32 + '"\ntenant = "beta"\n'
    )
    CertPrincipals.load(toml)
    for bad, message in [
        ('[{"tenant": "acme"}]', "exactly one of spki_sha256 and san"),
        ('[{"san": "a", "spki_sha256": "' + "ab" * 32 + '", "tenant": "acme"}]', "exactly one"),
        ('[{"spki_sha256": "abc", "tenant": "acme"}]', "spki_sha256"),
        ('[{"san": "a", "tenant": "acme", "operations": ["destroy"]}]', "operations"),
        ('[{"san": "a", "tenant": "acme", "role": "admin"}]', "role"),
        ("{not json", "not valid"),
    ]:
        path = tmp_path / "p.json"
        path.write_text(bad)
        with pytest.raises(IdentityConfigError, match=message):
            CertPrincipals.load(path)
    subjects = tmp_path / "s.json"
    subjects.write_text('[{"subject": "system:serviceaccount:*:*", "tenant": "acme"}]')
    settings = Settings(
        jwt_issuer=ISSUER, jwt_audience=AUDIENCE, jwt_jwks_url=jwks_server.url, jwt_subjects_file=subjects
    )
    with pytest.raises(IdentityConfigError, match="KMS_JWT_SUBJECTS_FILE"):
        load_identities(settings)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tls_cert_file": "c"}, "set both"),
        (
            {"tls_cert_file": "c", "tls_key_file": "k", "tls_client_cert": "optional"},
            "needs KMS_TLS_CLIENT_CA_FILE",
        ),
        ({"tls_client_ca_file": "ca"}, "needs KMS_TLS_CERT_FILE"),
        (
            {"tls_cert_file": "c", "tls_key_file": "k", "cert_principals_file": "p"},
            "KMS_CERT_PRINCIPALS_FILE needs",
        ),
        ({"jwt_audience": "a"}, "also needs KMS_JWT_ISSUER, KMS_JWT_SUBJECTS_FILE"),
        (
            {"jwt_issuer": "i", "jwt_audience": "a", "jwt_subjects_file": "s"},
            "exactly one of KMS_JWT_JWKS_URL and KMS_JWT_JWKS_FILE",
        ),
        (
            {
                "jwt_issuer": "i",
                "jwt_audience": "a",
                "jwt_subjects_file": "s",
                "jwt_jwks_url": "http://k8s/jwks",
            },
            "must be an https:// URL",
        ),
    ],
)
def test_identity_settings_are_checked_together(values: dict[str, str], message: str) -> None:
    from kms_service.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match=message):
        load_settings(**values)
