"""Registry credentials: they never cross an origin (scheme, host, port), a plain-http
token realm is refused with TLS verification on, and the password can come from stdin
or the environment instead of the command line (where `ps` shows it to every user).

Against Debian's docker-registry (casfs.testing.registry) with htpasswd or token auth.
What the real registry cannot do (a token realm that redirects to another port, an https
server redirecting to plain http) is played by small servers of the test's own, which
record whether each request carried an Authorization header.
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import os
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from casfs.errors import RegistryAuthError, RegistryError, UsageError
from casfs.testing import ocibuild as ob
from casfs.testing.registry import (
    FaultProxy,
    ProxyFault,
    RegistryServer,
    TokenServer,
    registry_available,
    self_signed_cert,
    skopeo_push,
)
from indexer.index import index_image
from indexer.registry import (
    PASSWORD_ENV,
    RegistryClient,
    RegistryOptions,
    find_credentials,
    registry_options,
)
from tests.treecheck import file_store

USER, PASSWORD = "carol", "pw-of-carol"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
LAYERS = [[ob.file("etc/os-release", "ID=casfs\n"), ob.file("bin/tool", b"\x7fELF" + b"y" * 4000)]]


def _need_registry() -> None:
    why = registry_available()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + "; required in CI")
        pytest.skip(why)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> ob.BuiltImage:
    return ob.write_oci_layout(tmp_path_factory.mktemp("img") / "img", LAYERS, tag="v1")


# --- a recording server of the test's own --------------------------------------------------


class Recorder:
    """An HTTP(S) server on 127.0.0.1 that records (path, Authorization) of each request
    and answers with `answer(handler)`."""

    def __init__(self, answer: Callable[[http.server.BaseHTTPRequestHandler], None],
                 tls: tuple[Path, Path] | None = None) -> None:
        self.seen: list[tuple[str, str | None]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                owner.seen.append((self.path, self.headers.get("Authorization")))
                answer(self)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.scheme = "https" if tls else "http"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def redirect_to(base: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(307)
        h.send_header("Location", base + h.path)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return answer


def not_found(h: http.server.BaseHTTPRequestHandler) -> None:
    h.send_response(404)
    h.send_header("Content-Length", "0")
    h.end_headers()


class FrontedTokenServer(TokenServer):
    """A token service whose realm (what the registry's challenge names) is `front`, a
    server on another port that redirects to it."""

    front = ""

    @property
    def url(self) -> str:
        return self.front or f"http://127.0.0.1:{self.port}"

    @property
    def real_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --- the token request ---------------------------------------------------------------------


def forward_to(base: str) -> Callable[[http.server.BaseHTTPRequestHandler], None]:
    """Answer as the server at `base` does (a plain proxy, headers and all)."""
    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        conn = http.client.HTTPConnection(urlsplit(base).netloc, timeout=30)
        conn.request("GET", h.path, headers={k: v for k, v in h.headers.items()
                                             if k.lower() not in ("host", "connection")})
        resp = conn.getresponse()
        body = resp.read()
        h.send_response(resp.status)
        h.send_header("Content-Type", resp.getheader("Content-Type") or "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
        conn.close()
    return answer


@pytest.fixture(scope="module")
def redirected_realm(tmp_path_factory: pytest.TempPathFactory, layout: ob.BuiltImage
                     ) -> Iterator[tuple[RegistryServer, FrontedTokenServer, Recorder]]:
    """A token-auth registry whose realm answers 307 to the token service on another port
    (while the images are pushed, it forwards to it instead: skopeo does not take its
    credentials across that redirect either)."""
    _need_registry()
    work = tmp_path_factory.mktemp("realm")
    mode = {"redirect": False}
    with FrontedTokenServer(work, users={USER: PASSWORD}, public=("public/",)) as ts:
        forward, redirect = forward_to(ts.real_url), redirect_to(ts.real_url)
        front = Recorder(lambda h: redirect(h) if mode["redirect"] else forward(h))
        ts.front = front.url
        try:
            with RegistryServer(work / "registry", token=ts) as reg:
                for repo in ("public/app", "private/app"):
                    skopeo_push(layout.path, "v1", f"{reg.host}/{repo}:v1", creds=f"{USER}:{PASSWORD}")
                mode["redirect"] = True
                yield reg, ts, front
        finally:
            front.close()


def test_token_credentials_do_not_follow_a_redirect_to_another_port(
        redirected_realm: tuple[RegistryServer, FrontedTokenServer, Recorder], tmp_path: Path) -> None:
    """The realm the registry names gets the basic credentials; the token service it
    redirects to, on another port (another origin), does not: it sees anonymous requests,
    so the private repository is denied and the public one still indexes."""
    reg, ts, front = redirected_realm
    ts.requests.clear()
    front.seen.clear()
    options = RegistryOptions(tls_verify=False, creds=f"{USER}:{PASSWORD}", backoff=0.01)
    with pytest.raises(RegistryAuthError):
        index_image(f"docker://{reg.host}/private/app:v1", file_store(tmp_path / "s1"),
                    registry=options)
    assert front.seen and all(auth == BASIC for _path, auth in front.seen)
    assert ts.requests and all(r["user"] is None for r in ts.requests), ts.requests
    ts.requests.clear()
    result = index_image(f"docker://{reg.host}/public/app:v1", file_store(tmp_path / "s2"),
                         registry=options)
    assert result.digest
    assert ts.requests and all(r["user"] is None for r in ts.requests), ts.requests


@pytest.fixture(scope="module")
def tls_token_registry(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[tuple[RegistryServer, TokenServer]]:
    """An https registry (self-signed) whose token service is plain http."""
    _need_registry()
    work = tmp_path_factory.mktemp("tlsrealm")
    with TokenServer(work, users={USER: PASSWORD}, public=("public/",)) as ts, \
            RegistryServer(work / "registry", token=ts, tls=True) as reg:
        yield reg, ts


def test_http_realm_refused_with_tls_verification(tls_token_registry: tuple[RegistryServer, TokenServer],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry speaks verified https but names a plain-http token realm: no token is
    asked for (nor credentials sent) over http unless TLS verification is off."""
    reg, ts = tls_token_registry
    assert reg.cert is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(reg.cert))  # trust the registry's certificate
    ts.requests.clear()
    with pytest.raises(RegistryAuthError, match="plain http"):
        RegistryClient(reg.host, "public/app",
                       RegistryOptions(creds=f"{USER}:{PASSWORD}", backoff=0.01))
    assert ts.requests == []
    # With verification off (as skopeo's --tls-verify=false) the http realm is used.
    RegistryClient(reg.host, "public/app",
                   RegistryOptions(tls_verify=False, creds=f"{USER}:{PASSWORD}", backoff=0.01))
    assert [r["user"] for r in ts.requests] == [USER]


# --- manifests and blobs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, layout: ob.BuiltImage
                   ) -> Iterator[RegistryServer]:
    _need_registry()
    with RegistryServer(tmp_path_factory.mktemp("basic"), htpasswd={USER: PASSWORD}) as reg:
        skopeo_push(layout.path, "v1", f"{reg.host}/private/app:v1", creds=f"{USER}:{PASSWORD}")
        yield reg


def test_manifest_and_blob_redirects_to_another_origin_drop_credentials(
        basic_registry: RegistryServer, tmp_path: Path) -> None:
    """Manifest and blob GETs answered 307 to another port (a CDN, a presigned URL) are
    followed without the registry's Authorization."""
    with FaultProxy(basic_registry.host) as other, FaultProxy(basic_registry.host) as front:
        other.upstream_auth = BASIC  # what a presigned URL carries itself
        front.redirect_blobs = other.host
        manifest_path = "/v2/private/app/manifests/v1"
        front.faults.append(ProxyFault(manifest_path + "$", 307, times=100,
                                       headers={"Location": f"http://{other.host}{manifest_path}"}))
        result = index_image(f"docker://{front.host}/private/app:v1", file_store(tmp_path / "s"),
                             registry=RegistryOptions(tls_verify=False, creds=f"{USER}:{PASSWORD}"))
        assert result.digest
        redirected = [(p, auth) for p, auth in other.client_auth if "/manifests/" in p or "/blobs/" in p]
        assert any("/manifests/" in p for p, _ in redirected)
        assert any("/blobs/" in p for p, _ in redirected)
        assert not any(auth for _, auth in redirected)
        assert any(auth for p, auth in front.client_auth if p == "/v2/" or "/manifests/" in p)


def test_https_to_http_redirect_refused_with_tls_verification(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry on verified https redirecting a manifest to plain http: refused (a tag's
    manifest cannot be checked against a digest, so it must not come over http)."""
    if registry_available():
        pytest.skip(str(registry_available()))  # openssl is needed for the certificate
    cert, key = self_signed_cert(tmp_path / "tls")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    plain = Recorder(not_found)

    def answer(h: http.server.BaseHTTPRequestHandler) -> None:
        if h.path == "/v2/":
            h.send_response(200)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            redirect_to(plain.url)(h)

    secure = Recorder(answer, tls=(cert, key))
    try:
        client = RegistryClient(f"127.0.0.1:{secure.port}", "app",
                                RegistryOptions(creds=f"{USER}:{PASSWORD}", backoff=0.01))
        with pytest.raises(RegistryError, match="https to plain http"):
            client.get_manifest("v1", "test")
        assert plain.seen == []
    finally:
        secure.close()
        plain.close()


# --- the password off the command line ---------------------------------------------------------


def test_registry_options_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    opts = registry_options(username=USER, password_stdin=True, stdin=io.StringIO(PASSWORD + "\n"))
    assert find_credentials("reg.example.com", "a", opts) == (USER, PASSWORD)
    assert PASSWORD not in repr(opts)
    opts = registry_options(username=USER, password_stdin=True, stdin=io.StringIO("p w:x\r\n"))
    assert (opts.username, opts.password) == (USER, "p w:x")
    opts = registry_options(username=USER, environ={PASSWORD_ENV: PASSWORD})
    assert find_credentials("reg.example.com", "a", opts) == (USER, PASSWORD)
    # --password-stdin wins over the environment.
    opts = registry_options(username=USER, password_stdin=True, stdin=io.StringIO("from-stdin"),
                            environ={PASSWORD_ENV: PASSWORD})
    assert opts.password == "from-stdin"
    # --creds keeps working (and stays out of repr).
    opts = registry_options(creds=f"{USER}:{PASSWORD}", tls_verify=False, authfile="/x.json")
    assert find_credentials("h", "r", opts) == (USER, PASSWORD) and not opts.tls_verify
    assert opts.authfile == "/x.json" and PASSWORD not in repr(opts)
    # Nothing given: the auth files decide, as before.
    assert registry_options(environ={}) == RegistryOptions()
    for kwargs, match in [
        ({"password_stdin": True, "stdin": io.StringIO("pw")}, "needs --username"),
        ({"username": USER, "environ": {}}, "--password-stdin"),
        ({"username": USER, "password_stdin": True, "stdin": io.StringIO("\n")}, "no password"),
        ({"username": USER, "password_stdin": True, "stdin": io.StringIO("x" * 70_000)}, "more than"),
        ({"creds": "a:b", "username": USER, "environ": {PASSWORD_ENV: "p"}}, "pass one"),
        ({"username": "a:b", "environ": {PASSWORD_ENV: "p"}}, "without ':'"),
    ]:
        with pytest.raises(UsageError, match=match):
            registry_options(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("source", ["stdin", "env"])
def test_password_from_stdin_or_environment_against_a_real_registry(
        basic_registry: RegistryServer, tmp_path: Path, source: str) -> None:
    ref = f"docker://{basic_registry.host}/private/app:v1"
    if source == "stdin":
        opts = registry_options(username=USER, password_stdin=True, tls_verify=False,
                                stdin=io.StringIO(PASSWORD + "\n"), environ={})
    else:
        opts = registry_options(username=USER, tls_verify=False, environ={PASSWORD_ENV: PASSWORD})
    result = index_image(ref, file_store(tmp_path / "s"), registry=opts)
    assert result.digest
    wrong = registry_options(username=USER, tls_verify=False, environ={PASSWORD_ENV: "nope"})
    with pytest.raises(RegistryAuthError, match=f"rejected the credentials of {USER}"):
        index_image(ref, file_store(tmp_path / "s2"), registry=wrong)
