"""casfs's own SigV4 signer against botocore's, and where its settings come from. (The
S3 tests against SeaweedFS, which checks signatures, exercise it for real.)"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from casfs.store.sigv4 import FrozenCredentials, Signer, from_environment, query_string

NOW = datetime.datetime(2026, 11, 21, 13, 45, 7, tzinfo=datetime.UTC)


@pytest.mark.parametrize(("method", "body", "headers", "token"), [
    ("GET", b"", {}, None),
    ("LIST", b"", {}, None),
    ("GET", b"", {"Range": "bytes=10-99"}, "session-token/xyz"),
    ("HEAD", b"", {}, None),
    ("PUT", b"\x00chunk bytes" * 100, {"Content-MD5": "abc=="}, None),
])
def test_signature_matches_botocore(monkeypatch: pytest.MonkeyPatch, method: str, body: bytes,
                                    headers: dict[str, str], token: str | None) -> None:
    import botocore.auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: NOW.replace(tzinfo=None))
    url = "http://127.0.0.1:8333/bucket/casfs/blobs/ab/ab%2Bcd~x"
    if method == "LIST":  # a bucket request with a query string (ListObjectsV2)
        method = "GET"
        url = "http://127.0.0.1:8333/bucket?" + query_string(
            {"list-type": "2", "prefix": "casfs/traces/m/ab+c d/", "continuation-token": "x/y=="})
    req = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    botocore.auth.S3SigV4Auth(Credentials("AKID", "secret/key", token), "s3", "eu-west-3") \
        .add_auth(req)
    ours = Signer("eu-west-3").headers(method, url, FrozenCredentials("AKID", "secret/key", token),
                                       body=body, headers=headers, now=NOW)
    assert ours["Authorization"] == req.headers["Authorization"]
    assert ours["X-Amz-Content-Sha256"] == req.headers["X-Amz-Content-Sha256"]
    assert ours.get("X-Amz-Security-Token") == req.headers.get("X-Amz-Security-Token")


def test_settings_from_environment(tmp_path: Path) -> None:
    base = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000/", "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s", "HOME": str(tmp_path)}
    s = from_environment(base)
    assert s is not None and s.endpoint == "http://127.0.0.1:9000" and s.region == "us-east-1"
    assert s.credentials.get_frozen_credentials() == FrozenCredentials("k", "s", None)
    assert from_environment({**base, "AWS_ENDPOINT_URL_S3": "http://s3:1", "AWS_REGION": "x",
                             "AWS_SESSION_TOKEN": "t"}).endpoint == "http://s3:1"
    # Anything the environment does not settle goes to boto3's chain.
    assert from_environment({k: v for k, v in base.items() if k != "AWS_ENDPOINT_URL"}) is None
    assert from_environment({k: v for k, v in base.items() if k != "AWS_SECRET_ACCESS_KEY"}) is None
    assert from_environment({**base, "AWS_PROFILE": "dev"}) is None
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\nregion = eu-north-1\n")
    assert from_environment(base) is None  # the config file may set the region
    assert from_environment({**base, "AWS_DEFAULT_REGION": "eu-north-1"}).region == "eu-north-1"
