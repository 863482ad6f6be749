"""AWS Signature Version 4 for the S3 data path, and where its settings come from.

casfs signs its own GET/HEAD/PUT requests (header authorization, payload SHA-256), so
that the daemon's hot path needs neither boto3 nor botocore: importing boto3 and building
a client costs ~0.3 s of CPU, which a mount on a cold node would otherwise spend before
it serves. Settings come from the standard AWS environment variables when they say
everything (`from_environment`); otherwise casfs.store.s3 asks boto3's chain (profiles,
instance roles, SSO) once and signs with what it resolved.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote, urlsplit

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class CredentialSource(Protocol):
    """What botocore's credential objects offer (refreshable ones included)."""

    def get_frozen_credentials(self) -> FrozenCredentials: ...


@dataclass(frozen=True)
class FrozenCredentials:
    access_key: str
    secret_key: str
    token: str | None = None


@dataclass(frozen=True)
class StaticCredentials:
    frozen: FrozenCredentials

    def get_frozen_credentials(self) -> FrozenCredentials:
        return self.frozen


@dataclass(frozen=True)
class S3Settings:
    endpoint: str  # scheme://host[:port], no trailing slash
    region: str
    credentials: CredentialSource | None


def from_environment(env: dict[str, str] | None = None) -> S3Settings | None:
    """Endpoint, region and keys from AWS_* variables, when they are all there and
    nothing else (a config file's region, a profile) could say otherwise; else None."""
    env = dict(os.environ) if env is None else env
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    key, secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not (endpoint and key and secret) or env.get("AWS_PROFILE"):
        return None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region:
        config = env.get("AWS_CONFIG_FILE") or str(Path(env.get("HOME", "/")) / ".aws" / "config")
        if Path(config).exists():
            return None  # the config file may name the region: let boto3 read it
        region = "us-east-1"
    creds = FrozenCredentials(key, secret, env.get("AWS_SESSION_TOKEN") or None)
    return S3Settings(endpoint.rstrip("/"), region, StaticCredentials(creds))


class Signer:
    """Adds SigV4 headers to S3 requests. Thread-safe (signing keys cached per day)."""

    def __init__(self, region: str, service: str = "s3") -> None:
        self.region = region
        self.service = service
        self._keys: dict[tuple[str, str], bytes] = {}

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._keys.get((secret, day))
        if cached is None:
            k = _hmac(("AWS4" + secret).encode(), day)
            for part in (self.region, self.service, "aws4_request"):
                k = _hmac(k, part)
            self._keys = {(secret, day): k}  # one day, one key: drop the old one
            cached = k
        return cached

    def headers(self, method: str, url: str, creds: FrozenCredentials, *,
                body: bytes = b"", headers: dict[str, str] | None = None,
                now: datetime.datetime | None = None) -> dict[str, str]:
        """The request's headers with Host, X-Amz-Date, X-Amz-Content-Sha256, the
        session token (if any) and Authorization added. url must be already encoded
        (its path is the canonical URI as sent); a query string must be the one
        query_string() made."""
        parts = urlsplit(url)
        now = now or datetime.datetime.now(datetime.UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        payload = hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256
        out = dict(headers or {})
        out["Host"] = parts.netloc
        out["X-Amz-Date"] = amz_date
        out["X-Amz-Content-Sha256"] = payload
        if creds.token:
            out["X-Amz-Security-Token"] = creds.token
        canonical = {k.lower(): " ".join(str(v).split()) for k, v in out.items()}
        names = sorted(canonical)
        signed = ";".join(names)
        request = "\n".join([
            method, parts.path or "/", parts.query,
            "".join(f"{n}:{canonical[n]}\n" for n in names), signed, payload,
        ])
        scope = f"{day}/{self.region}/{self.service}/aws4_request"
        to_sign = "\n".join([ALGORITHM, amz_date, scope,
                             hashlib.sha256(request.encode()).hexdigest()])
        signature = hmac.new(self._signing_key(creds.secret_key, day), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        out["Authorization"] = (f"{ALGORITHM} Credential={creds.access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
        return out


def query_string(params: dict[str, str]) -> str:
    """A query string in SigV4's canonical form (sorted, every byte but unreserved ones
    percent-encoded), to be sent exactly as signed."""
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
                    for k, v in sorted(params.items()))


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()
