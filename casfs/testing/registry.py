"""A real OCI registry for tests and benchmarks, and what goes around it.

- ``RegistryServer``: Debian's ``docker-registry`` (the reference implementation,
  distribution 2.8) started on a free port with a throwaway config: filesystem storage in
  a scratch directory, plain http (or https with a self-signed certificate), optionally
  htpasswd basic auth or token auth. Its binary is run directly and stopped by PID; the
  Debian package's own systemd service is never used.
- ``TokenServer``: a small token service for the registry's ``auth: token`` mode: it
  checks basic credentials (or grants anonymous pulls on some repositories) and issues
  RS256 JWTs signed with a throwaway key whose self-signed certificate the registry
  trusts (``rootcertbundle``); keys, certificates and signatures come from ``openssl``.
- ``FaultProxy``: an HTTP proxy in front of a registry that corrupts a blob's bytes, cuts
  a blob response after N bytes, answers errors (5xx, 429 with Retry-After), throttles
  blob bodies, and logs every request (with Range headers) and how many blob bodies were
  in flight at once.
- ``skopeo_push()``: ``skopeo copy oci:<layout>:<tag> docker://host/repo:tag``;
  ``push_layout_raw()`` for Docker schema2 images, which skopeo's oci: transport skips.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

REGISTRY_BIN = "/usr/bin/docker-registry"

__all__ = ["RegistryServer", "TokenServer", "FaultProxy", "skopeo_push", "push_layout_raw", "free_port",
           "self_signed_cert", "htpasswd_line", "registry_available"]


def registry_available() -> str | None:
    """None if a registry can be started here, else why not."""
    if not os.access(REGISTRY_BIN, os.X_OK):
        return f"{REGISTRY_BIN} missing (apt-get install docker-registry)"
    if shutil.which("skopeo") is None:
        return "skopeo missing (apt-get install skopeo)"
    if shutil.which("openssl") is None:
        return "openssl missing"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def self_signed_cert(directory: Path, name: str = "casfs-test", cn: str = "127.0.0.1") -> tuple[Path, Path]:
    """(cert.pem, key.pem): an RSA-2048 self-signed certificate for ``cn`` (also an IP SAN)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    san = f"IP:{cn}" if re.fullmatch(r"[0-9.]+", cn) else f"DNS:{cn}"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True)
    return cert, key


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line (the registry accepts only bcrypt), via htpasswd or python bcrypt."""
    if shutil.which("htpasswd"):
        out = subprocess.run(["htpasswd", "-Bbn", user, password], check=True,
                             capture_output=True, text=True).stdout
        return out.strip()
    import bcrypt  # type: ignore[import-not-found]

    return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"


class RegistryServer:
    """``docker-registry serve config.yml`` on 127.0.0.1:<free port>."""

    def __init__(
        self,
        workdir: Path,
        *,
        htpasswd: dict[str, str] | None = None,
        token: TokenServer | None = None,
        tls: bool = False,
        storage: Path | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage = storage or self.workdir / "data"
        self.htpasswd = htpasswd
        self.token = token
        self.tls = tls
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "registry.log"
        self.cert: Path | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def _config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls:
            cert, key = self_signed_cert(self.workdir / "tls")
            self.cert = cert
            lines += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.htpasswd is not None:
            path = self.workdir / "htpasswd"
            path.write_text("".join(htpasswd_line(u, p) + "\n" for u, p in self.htpasswd.items()))
            lines += ["auth:", "  htpasswd:", "    realm: casfs-test", f"    path: {path}"]
        elif self.token is not None:
            lines += ["auth:", "  token:", f"    realm: {self.token.url}/token",
                      f"    service: {self.token.service}", f"    issuer: {self.token.issuer}",
                      f"    rootcertbundle: {self.token.cert}"]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 30.0) -> RegistryServer:
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise RuntimeError(f"{REGISTRY_BIN} is not installed (apt-get install docker-registry)")
        self.port = free_port()
        config = self.workdir / "config.yml"
        config.write_text(self._config())
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.workdir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("docker-registry did not start listening") from None
                time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def skopeo_push(layout: Path | str, tag: str, dest: str, *, all_platforms: bool = False,
                creds: str | None = None, tls_verify: bool = False,
                extra: list[str] | None = None) -> str:
    """Copy ``oci:<layout>:<tag>`` to ``docker://<dest>`` (host/repo:tag); returns skopeo's output.
    Digests are preserved (skopeo fails rather than recompress or convert)."""
    cmd = ["skopeo", "--insecure-policy", "copy", "--retry-times", "2",
           f"--dest-tls-verify={'true' if tls_verify else 'false'}", "--preserve-digests"]
    if all_platforms:
        cmd.append("--all")
    if creds:
        cmd += ["--dest-creds", creds]
    cmd += extra or []
    cmd += [f"oci:{layout}:{tag}", f"docker://{dest}"]
    env = dict(os.environ)
    env.pop("REGISTRY_AUTH_FILE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def push_layout_raw(layout: Path | str, tag: str, host: str, repo: str) -> None:
    """Push an OCI layout's tagged image with the registry API itself (blob uploads, then
    manifests children first), byte for byte. For what skopeo's oci: transport will not
    read: a Docker schema2 manifest or manifest list named in index.json. Plain http, no auth."""
    root = Path(layout)
    index = json.loads((root / "index.json").read_text())
    top = next(m for m in index["manifests"]
               if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)

    def blob(digest: str) -> bytes:
        return (root / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()

    def call(method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(host, timeout=60)
        conn.request(method, url, body=body, headers={"Content-Length": str(len(body)), **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status >= 300:
            raise RuntimeError(f"{method} {url}: HTTP {resp.status}")
        return resp

    def put_blob(digest: str) -> None:
        loc = call("POST", f"/v2/{repo}/blobs/uploads/").getheader("Location", "")
        path = urlsplit(loc)
        query = (path.query + "&" if path.query else "") + f"digest={digest}"
        call("PUT", f"{path.path}?{query}", blob(digest), {"Content-Type": "application/octet-stream"})

    def put_manifest(desc: dict[str, Any], ref: str) -> None:
        doc = json.loads(blob(desc["digest"]))
        for child in doc.get("manifests", []):
            put_manifest(child, child["digest"])
        if "config" in doc:
            for d in [doc["config"], *doc.get("layers", [])]:
                put_blob(d["digest"])
        call("PUT", f"/v2/{repo}/manifests/{ref}", blob(desc["digest"]),
             {"Content-Type": desc["mediaType"]})

    put_manifest(top, tag)


# --- a token service for `auth: token` ---------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _LocalHTTPServer:
    """An http.server on 127.0.0.1:<free port>, served from a daemon thread; a context
    manager. A subclass's start() builds its handler class and passes it to _serve()."""

    def __init__(self) -> None:
        self._server: http.server.ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> Self:
        raise NotImplementedError

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> Self:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


class TokenServer(_LocalHTTPServer):
    """The registry's token service (docker's token auth spec), on 127.0.0.1:<free port>.

    ``users`` may pull and push anywhere; anonymous requests get pull on repositories
    whose name starts with one of ``public``; bad credentials get 401. Every request is
    logged in ``requests`` as {"user", "scopes", "service"}. ``key_name`` picks the JSON
    field the token is returned in ("token" or "access_token").
    """

    def __init__(self, workdir: Path, users: dict[str, str], public: tuple[str, ...] = (),
                 service: str = "casfs-registry", issuer: str = "casfs-token-issuer") -> None:
        super().__init__()
        self.workdir = Path(workdir)
        self.users = users
        self.public = public
        self.service = service
        self.issuer = issuer
        self.cert, self.key = self_signed_cert(self.workdir / "token", "token", "casfs-token")
        der = subprocess.run(["openssl", "x509", "-in", str(self.cert), "-outform", "DER"],
                             check=True, capture_output=True).stdout
        self._x5c = base64.b64encode(der).decode()
        self.key_name = "token"
        self.requests: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "." +
                         _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)],
                             input=signing_input.encode(), check=True, capture_output=True).stdout
        return signing_input + "." + _b64url(sig)

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            wanted = [a for a in actions.split(",") if a]
            if user is not None:
                allowed = wanted
            elif name.startswith(self.public):
                allowed = [a for a in wanted if a == "pull"]
            else:
                allowed = []
            access.append({"type": "repository", "name": name, "actions": allowed})
        return access

    def start(self) -> TokenServer:
        owner = self

        class Handler(_QuietHandler):
            def do_GET(self) -> None:  # noqa: N802
                url = urlsplit(self.path)
                query = parse_qs(url.query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    try:
                        u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    except ValueError:
                        u, p = "", ""
                    if owner.users.get(u) != p or not u:
                        owner.requests.append({"user": u, "scopes": query.get("scope", []),
                                               "denied": True})
                        self._json(401, {"errors": [{"code": "UNAUTHORIZED",
                                                     "message": "bad credentials"}]})
                        return
                    user = u
                scopes = query.get("scope", [])
                owner.requests.append({"user": user, "scopes": scopes,
                                       "service": query.get("service", [""])[0]})
                now = int(time.time())
                claims = {"iss": owner.issuer, "sub": user or "", "aud": owner.service,
                          "exp": now + 300, "nbf": now - 10, "iat": now,
                          "jti": secrets.token_hex(8), "access": owner._grant(user, scopes)}
                self._json(200, {owner.key_name: owner.sign(claims), "expires_in": 300})

            def _json(self, status: int, doc: dict[str, Any]) -> None:
                body = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return self._serve(Handler)


# --- a fault-injecting proxy ---------------------------------------------------------------

_BLOB_RE = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


@dataclass
class ProxyFault:
    """Answer ``status`` (with ``headers``) to the next ``times`` requests whose path
    matches ``path`` (a regex)."""

    path: str
    status: int
    times: int = 1
    headers: dict[str, str] = field(default_factory=dict)


class FaultProxy(_LocalHTTPServer):
    """An HTTP/1.1 proxy to ``upstream`` (host:port, plain http) that can break things.

    Knobs, settable while it runs: ``corrupt`` (blob digests whose bytes get one byte
    flipped mid-body, length kept), ``cut_after`` (the first response for each blob is cut
    after that many body bytes: headers promise the whole body, then the connection is
    closed), ``faults`` (ProxyFault list), ``throttle`` (seconds slept per 64 KiB of blob
    body), ``redirect_blobs`` (host:port: blob GETs are answered 307 to the same path
    there, as a registry on S3 redirects to a presigned URL), ``upstream_auth`` (an
    Authorization value sent upstream in place of the client's: a presigned URL's
    credentials). ``log`` holds (method, path, Range header, status) per request,
    ``client_auth`` (path, whether the client sent Authorization), ``max_blob_inflight``
    the most blob bodies streamed at once.
    """

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream
        self.corrupt: set[str] = set()
        self.cut_after: int | None = None
        self.faults: list[ProxyFault] = []
        self.throttle = 0.0
        self.redirect_blobs: str | None = None
        self.upstream_auth: str | None = None
        self.client_auth: list[tuple[str, bool]] = []
        self.log: list[tuple[str, str, str | None, int]] = []
        self.max_blob_inflight = 0
        self._inflight = 0
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_gets(self, digest: str | None = None) -> list[tuple[str, str, str | None, int]]:
        return [e for e in self.log if e[0] == "GET" and "/blobs/" in e[1]
                and (digest is None or e[1].endswith(digest))]

    def start(self) -> FaultProxy:
        owner = self

        class Handler(_QuietHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                owner._handle(self, "GET")

            def do_HEAD(self) -> None:  # noqa: N802
                owner._handle(self, "HEAD")

        return self._serve(Handler)

    def _fault_for(self, path: str) -> ProxyFault | None:
        with self._lock:
            for f in self.faults:
                if f.times > 0 and re.search(f.path, path):
                    f.times -= 1
                    return f
        return None

    def _handle(self, h: http.server.BaseHTTPRequestHandler, method: str) -> None:
        path = h.path
        rng = h.headers.get("Range")
        with self._lock:
            self.client_auth.append((path, "Authorization" in h.headers))
        # Each request is logged before its answer goes out: a client that has its answer
        # (and a test that then reads the log) must find it there.
        if self.redirect_blobs and method == "GET" and _BLOB_RE.match(urlsplit(path).path):
            with self._lock:
                self.log.append((method, path, rng, 307))
            h.send_response(307)
            h.send_header("Location", f"http://{self.redirect_blobs}{path}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        fault = self._fault_for(path)
        if fault is not None:
            with self._lock:
                self.log.append((method, path, rng, fault.status))
            body = json.dumps({"errors": [{"code": "INJECTED", "message": "injected by FaultProxy"}]}).encode()
            h.send_response(fault.status)
            for k, v in fault.headers.items():
                h.send_header(k, v)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(body)
            return
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP and k.lower() != "host"}
        headers["Host"] = self.upstream
        if self.upstream_auth:
            headers["Authorization"] = self.upstream_auth
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
        except OSError:
            h.send_error(502)
            return
        with self._lock:
            self.log.append((method, path, rng, resp.status))
        m = _BLOB_RE.match(urlsplit(path).path)
        digest = m.group(2) if m and method == "GET" and resp.status in (200, 206) else None
        h.send_response(resp.status)
        length = resp.getheader("Content-Length")
        for k, v in resp.getheaders():
            if k.lower() not in _HOP:
                h.send_header(k, v)
        if length is None:
            h.send_header("Connection", "close")
            h.close_connection = True
        h.end_headers()
        if method == "HEAD":
            conn.close()
            return
        cut = None
        with self._lock:
            if digest and self.cut_after is not None and digest not in self._cut_done:
                self._cut_done.add(digest)
                cut = self.cut_after
            if digest:
                self._inflight += 1
                self.max_blob_inflight = max(self.max_blob_inflight, self._inflight)
        sent = 0
        start = _range_start(resp.getheader("Content-Range"))
        try:
            while True:
                data = resp.read(64 << 10)
                if not data:
                    break
                if digest and digest in self.corrupt:
                    data = _flip_middle(data, start + sent, int(resp.getheader("Content-Range", "").rpartition("/")[2] or length or 0))
                if cut is not None and sent + len(data) >= cut:
                    h.wfile.write(data[: cut - sent])
                    h.wfile.flush()
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)
                    h.close_connection = True
                    return
                h.wfile.write(data)
                sent += len(data)
                if digest and self.throttle:
                    time.sleep(self.throttle)
        except OSError:
            h.close_connection = True
        finally:
            if digest:
                with self._lock:
                    self._inflight -= 1
            conn.close()


def _range_start(content_range: str | None) -> int:
    m = re.match(r"bytes (\d+)-", content_range or "")
    return int(m.group(1)) if m else 0


def _flip_middle(data: bytes, offset: int, total: int) -> bytes:
    """Flip the byte at total // 2 if it falls in this piece (starting at ``offset``)."""
    target = total // 2
    if offset <= target < offset + len(data):
        i = target - offset
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    return data


def http_get(url: str, headers: dict[str, str] | None = None,
             opener: Callable[..., Any] = urllib.request.urlopen) -> tuple[int, bytes]:
    """A plain GET (for assertions against a registry or proxy): (status, body)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
