"""A client for the OCI distribution API: `casfs index docker://host/repo:tag`.

It resolves a tag or digest (``GET /v2/<repo>/manifests/<ref>``, accepting OCI and Docker
schema2 manifests and indexes), follows an image index / manifest list to the wanted
platform, checks every manifest and the config against the digest that names it, and
hands out the layers as ``Layer`` objects whose ``open()`` streams the blob
(``GET /v2/<repo>/blobs/<digest>``, redirects followed) with its digest checked while it
streams: the last read of a blob whose bytes do not match raises LayerDigestMismatch.
Nothing is held whole in memory or written to a temp file.

Transport, as skopeo does it: https by default; with ``tls_verify=False`` https without
certificate checks, falling back to plain http when the server speaks http.

Authentication, as registries do it: each request goes out anonymously or with what the
last challenge asked for. A 401 carries ``WWW-Authenticate``: ``Bearer realm=…,service=…,
scope=…`` sends the client to the realm for a token (with basic credentials when it has
some; the answer's ``token`` or ``access_token``); ``Basic`` wants the credentials on every
request. Credentials come from ``--creds user:pass`` (visible to every user in ``ps``),
else ``--username`` with the password on stdin (``--password-stdin``) or in
``$CASFS_REGISTRY_PASSWORD`` (``registry_options`` builds the options from those), else
``--authfile``, else ``$REGISTRY_AUTH_FILE``, ``$XDG_RUNTIME_DIR/containers/auth.json``,
``~/.config/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json`` (``auths.<host>[/<repo>].auth`` = base64 of ``user:pass``, as
docker, podman and skopeo write them; credential helpers are not run).

Credentials stay on their origin (scheme, host, port): the registry's Authorization
(basic or its bearer token) goes only to the registry's own origin, the token service's
basic credentials only to the realm's origin; a redirect elsewhere (a blob to a CDN, a
token request to another port) is followed without them. With TLS verification on, a
plain-http token realm is refused, and so is any redirect from https to plain http.

Retries: 5xx, 429 (waiting what Retry-After says, up to a cap) and dropped connections
are retried with exponential backoff and jitter; a blob download that breaks resumes
with ``Range: bytes=<offset>-`` from where it broke, and the digest is still computed
over the whole stream.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import io
import json
import logging
import os
import random
import re
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import urlencode, urljoin, urlsplit

import urllib3
from urllib3.exceptions import (
    HTTPError,
    InsecureRequestWarning,
    NewConnectionError,
    SSLError,
)

from casfs.errors import (
    ImageError,
    ImageNotFound,
    LayerDigestMismatch,
    RegistryAuthError,
    RegistryError,
    UsageError,
)
from indexer.imageref import DOCKER_HUB, ImageRef
from indexer.mediatypes import DOCKER_LIST, DOCKER_MANIFEST, INDEX_TYPES, OCI_INDEX, OCI_MANIFEST
from indexer.oci import (
    MAX_CONFIG,
    MAX_JSON,
    Image,
    Layer,
    check_digest,
    config_diff_ids,
    descriptor,
    json_list,
    parse_json_object,
    pick_platform,
)

log = logging.getLogger(__name__)

USER_AGENT = "casfs-indexer/0.1"
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
SCHEMA1_TYPES = {
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
}
READ_SIZE = 1 << 20
MAX_REDIRECTS = 10
DOCKER_HUB_API = "registry-1.docker.io"
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
PASSWORD_ENV = "CASFS_REGISTRY_PASSWORD"
"""The registry password for --username when it does not come on stdin."""
MAX_PASSWORD_BYTES = 64 << 10


@dataclass
class RegistryOptions:
    """How to reach a registry. The retry knobs are for tests and impatient users."""

    creds: str | None = field(default=None, repr=False)  # "user:pass" (--creds: seen in ps)
    authfile: str | None = None
    username: str | None = None  # with password: --username and --password-stdin / env
    password: str | None = field(default=None, repr=False)
    tls_verify: bool = True
    retries: int = 6  # attempts after the first, per request (and per stalled blob offset)
    backoff: float = 0.5  # first wait; doubles each attempt, with jitter
    max_backoff: float = 16.0
    max_retry_after: float = 60.0  # longest Retry-After honoured
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_resumes: int = 200  # blob resumes per download, however much each one progressed


# --- credentials --------------------------------------------------------------


def _auth_file_candidates(options: RegistryOptions) -> list[tuple[Path, bool]]:
    """(path, required) in the order skopeo reads them."""
    if options.authfile:
        return [(Path(options.authfile).expanduser(), True)]
    out: list[tuple[Path, bool]] = []
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        out.append((Path(env).expanduser(), False))
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        out.append((Path(runtime) / "containers" / "auth.json", False))
    out.append((Path.home() / ".config" / "containers" / "auth.json", False))
    docker_dir = os.environ.get("DOCKER_CONFIG")
    out.append(((Path(docker_dir) if docker_dir else Path.home() / ".docker") / "config.json", False))
    return out


def _normalize_auth_key(key: str) -> str:
    """An `auths` key as host[/path]: docker writes "https://index.docker.io/v1/"."""
    if "://" in key:
        key = urlsplit(key).netloc or key.split("://", 1)[1].split("/", 1)[0]
    key = key.rstrip("/")
    if key in ("index.docker.io", "registry-1.docker.io"):
        key = DOCKER_HUB
    return key


def _entry_credentials(entry: Any, what: str) -> tuple[str, str] | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, password = base64.b64decode(entry["auth"], validate=False).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise UsageError(f"{what}: the auth entry is not base64 of user:password") from None
        if not sep:
            raise UsageError(f"{what}: the auth entry is not base64 of user:password")
        return user, password
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return entry["username"], entry["password"]
    return None


def registry_options(*, creds: str | None = None, username: str | None = None,
                     password_stdin: bool = False, authfile: str | None = None,
                     tls_verify: bool = True, stdin: IO[str] | None = None,
                     environ: Mapping[str, str] | None = None) -> RegistryOptions:
    """RegistryOptions from the command line's registry flags: `--creds USER:PASS` (seen
    by every user in `ps`), or `--username USER` with the password read from stdin
    (`--password-stdin`, as podman and skopeo login: one line, its newline dropped) or
    from $CASFS_REGISTRY_PASSWORD; `--authfile`; `--tls-verify`. stdin and environ
    default to the process's."""
    environ = os.environ if environ is None else environ
    if creds is not None and (username is not None or password_stdin):
        raise UsageError("--creds and --username/--password-stdin both name credentials: "
                         "pass one")
    if password_stdin and username is None:
        raise UsageError("--password-stdin needs --username")
    password = None
    if username is not None:
        if not username or ":" in username:
            raise UsageError("--username wants a user name (without ':')")
        if password_stdin:
            password = _read_password(stdin if stdin is not None else sys.stdin)
        elif environ.get(PASSWORD_ENV):
            password = environ[PASSWORD_ENV]
        else:
            raise UsageError(f"--username needs the password on stdin (--password-stdin) or "
                             f"in ${PASSWORD_ENV}")
    elif environ.get(PASSWORD_ENV) and creds is None:
        log.warning("$%s is set but no --username names whose password it is: ignored",
                    PASSWORD_ENV)
    return RegistryOptions(creds=creds, authfile=authfile, tls_verify=tls_verify,
                           username=username, password=password)


def _read_password(stream: IO[str]) -> str:
    try:
        text = stream.read(MAX_PASSWORD_BYTES + 1)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--password-stdin: cannot read the password: {exc}") from exc
    if len(text) > MAX_PASSWORD_BYTES:
        raise UsageError(f"--password-stdin: more than {MAX_PASSWORD_BYTES} bytes on stdin")
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise UsageError("--password-stdin: no password on stdin")
    return text


def find_credentials(host: str, repo: str, options: RegistryOptions) -> tuple[str, str] | None:
    """(user, password) for host/repo: --creds, else --username with its password, else
    the first auth file that names it."""
    if options.creds is not None:
        user, sep, password = options.creds.partition(":")
        if not sep or not user:
            raise UsageError("--creds wants USER:PASSWORD")
        return user, password
    if options.username is not None:
        if options.password is None:
            raise UsageError("--username without a password")
        return options.username, options.password
    # Most specific first: host/a/b, host/a, host.
    parts = repo.split("/")
    wanted = [f"{host}/{'/'.join(parts[:i])}" for i in range(len(parts), 0, -1)] + [host]
    for path, required in _auth_file_candidates(options):
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            if required:
                raise UsageError(f"auth file {path} does not exist") from None
            continue
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read auth file {path}: {exc}") from exc
        if not isinstance(doc, dict):
            raise UsageError(f"auth file {path} is not a JSON object")
        auths = doc.get("auths")
        entries = {_normalize_auth_key(k): v for k, v in auths.items()} if isinstance(auths, dict) else {}
        for key in wanted:
            if key in entries:
                creds = _entry_credentials(entries[key], f"auth file {path}, {key}")
                if creds:
                    log.debug("credentials for %s from %s (%s)", host, path, key)
                    return creds
        helpers = doc.get("credHelpers")
        if doc.get("credsStore") or (isinstance(helpers, dict) and host in helpers):
            log.warning("%s names a credential helper for %s; casfs does not run credential "
                        "helpers: pass --creds or an auth file with the credentials", path, host)
    return None


# --- WWW-Authenticate ---------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SEP = re.compile(r"[\s,]*")
_EQ = re.compile(r"\s*=\s*")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


def parse_www_authenticate(value: str) -> list[tuple[str, dict[str, str]]]:
    """[(scheme lowercased, {param: value})] of a WWW-Authenticate header."""
    challenges: list[tuple[str, dict[str, str]]] = []
    pos = 0
    while pos < len(value):
        pos = _SEP.match(value, pos).end()  # type: ignore[union-attr]
        m = _TOKEN.match(value, pos)
        if not m:
            break
        token, pos = m.group(), m.end()
        eq = _EQ.match(value, pos)
        if challenges and eq and eq.end() > pos and value[pos:eq.end()].strip() == "=":
            pos = eq.end()
            q = _QUOTED.match(value, pos)
            if q:
                val, pos = re.sub(r"\\(.)", r"\1", q.group(1)), q.end()
            else:
                v = re.compile(r"[^\s,]*").match(value, pos)
                assert v is not None
                val, pos = v.group(), v.end()
            challenges[-1][1][token.lower()] = val
        else:
            challenges.append((token.lower(), {}))
    return challenges


def _registry_errors(data: bytes) -> str:
    """The registry's error body ({"errors": [{"code", "message", "detail"}]}) in a few words."""
    try:
        doc = json.loads(data)
        errs = doc.get("errors") if isinstance(doc, dict) else None
        if isinstance(errs, list) and errs:
            parts = []
            for e in errs[:3]:
                if isinstance(e, dict):
                    code, msg = e.get("code", ""), e.get("message", "")
                    parts.append(f"{code}: {msg}" if code and msg else str(code or msg))
            if parts:
                return "; ".join(parts)
    except (ValueError, AttributeError):
        pass
    text = data[:200].decode("utf-8", "replace").strip()
    return " ".join(text.split())


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --- the client -----------------------------------------------------------------


class RegistryClient:
    """One repository on one registry: pings it, authenticates, retries; thread-safe."""

    def __init__(self, host: str, repo: str, options: RegistryOptions | None = None) -> None:
        self.host = host
        self.repo = repo
        self.options = options or RegistryOptions()
        self.api_host = DOCKER_HUB_API if host == DOCKER_HUB else host
        self.creds = find_credentials(host, repo, self.options)
        self._lock = threading.Lock()
        self._authorization: str | None = None
        self._timeout = urllib3.Timeout(connect=self.options.connect_timeout,
                                        read=self.options.read_timeout)
        pool_kw: dict[str, Any] = {"num_pools": 8, "maxsize": 8}
        if not self.options.tls_verify:
            pool_kw["cert_reqs"] = "CERT_NONE"
        self._http = urllib3.PoolManager(**pool_kw)
        self.base = self._ping()

    # -- plumbing ----------------------------------------------------------------

    def _sleep_backoff(self, attempt: int, hint: float | None = None) -> None:
        if hint is not None:
            delay = min(hint, self.options.max_retry_after)
        else:
            delay = min(self.options.backoff * (2 ** attempt), self.options.max_backoff)
            delay *= random.uniform(0.75, 1.25)
        time.sleep(delay)

    def _send(self, method: str, url: str, headers: dict[str, str]) -> urllib3.BaseHTTPResponse:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureRequestWarning)
            return self._http.request(method, url, headers=headers, preload_content=False,
                                      redirect=False, retries=False, timeout=self._timeout)

    def _same_origin(self, url: str) -> bool:
        return _origin(url) == _origin(self.base)

    @staticmethod
    def _discard(resp: urllib3.BaseHTTPResponse, limit: int = 64 << 10) -> bytes:
        """Read a small error body and give the connection back."""
        try:
            data = resp.read(limit)
            if resp.read(1):
                resp.close()
        except (HTTPError, OSError):
            data = b""
            resp.close()
        resp.release_conn()
        return data

    def request(self, method: str, url: str, what: str, headers: dict[str, str] | None = None,
                *, auth: bool = True, credentials: str | None = None) -> urllib3.BaseHTTPResponse:
        """Send a request, following redirects, answering auth challenges, retrying 5xx /
        429 / connection failures. Returns the final response with its body unread (any
        status the caller has to judge). No credential crosses an origin: with `auth` the
        registry's Authorization goes only to the registry's origin; `credentials` (an
        Authorization value for the first URL's origin, e.g. a token service's basic
        credentials) only to that origin. With TLS verification on, a redirect from https
        to plain http is refused."""
        if headers and any(k.lower() == "authorization" for k in headers):
            raise ValueError("pass credentials=, not an Authorization header")
        attempt = reauth = redirects = 0
        credentials_origin = _origin(url)
        while True:
            hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
            sent_auth = None
            if auth and self._same_origin(url):
                sent_auth = self._authorization
                if sent_auth:
                    hdrs["Authorization"] = sent_auth
            elif credentials and _origin(url) == credentials_origin:
                hdrs["Authorization"] = credentials
            try:
                resp = self._send(method, url, hdrs)
            except SSLError as exc:
                hint = "" if not self.options.tls_verify else (
                    " (for a registry without TLS or with a self-signed certificate, "
                    "pass --tls-verify=false)")
                raise RegistryError(f"{what}: TLS with {urlsplit(url).netloc} failed: "
                                    f"{_exc_text(exc)}{hint}") from exc
            except (HTTPError, OSError) as exc:
                refused = isinstance(exc, NewConnectionError)
                if attempt >= (min(2, self.options.retries) if refused else self.options.retries):
                    raise RegistryError(f"{what}: {urlsplit(url).netloc} is unreachable: "
                                        f"{_exc_text(exc)}") from exc
                log.info("%s: %s; retrying", what, _exc_text(exc))
                self._sleep_backoff(attempt)
                attempt += 1
                continue
            status = resp.status
            if status in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                self._discard(resp)
                redirects += 1
                if redirects > MAX_REDIRECTS:
                    raise RegistryError(f"{what}: more than {MAX_REDIRECTS} redirects")
                target = urljoin(url, resp.headers["Location"])
                if urlsplit(target).scheme not in ("http", "https"):
                    raise RegistryError(f"{what}: redirected to {target[:100]!r}, not http(s)")
                if self.options.tls_verify and urlsplit(url).scheme == "https" and \
                        urlsplit(target).scheme == "http":
                    raise RegistryError(
                        f"{what}: {urlsplit(url).netloc} redirects from https to plain http "
                        f"({urlsplit(target).netloc}); refused with TLS verification on")
                url = target
                if status == 303:
                    method = "GET"
                continue
            if status == 401 and auth and self._same_origin(url):
                # Anonymous -> token (or basic); a refused token is renewed once (it may
                # have expired); a second refusal is final.
                challenge = resp.headers.get("WWW-Authenticate", "")
                body = self._discard(resp)
                if reauth >= 2 or not self._authenticate(challenge, sent_auth, what,
                                                         _registry_errors(body)):
                    self._final_401(what, body)
                reauth += 1
                continue
            if (status == 429 or 500 <= status <= 599) and status not in (501, 505) \
                    and attempt < self.options.retries:
                wait = _retry_after(resp.headers.get("Retry-After"))
                body = self._discard(resp)
                log.info("%s: HTTP %d (%s); retrying", what, status, _registry_errors(body))
                self._sleep_backoff(attempt, wait)
                attempt += 1
                continue
            return resp

    def _final_401(self, what: str, body: bytes) -> NoReturn:
        detail = _registry_errors(body)
        who = f"as {self.creds[0]}" if self.creds else "anonymously"
        hint = "" if self.creds else (" (pass --username with --password-stdin or "
                                      f"${PASSWORD_ENV}, --creds USER:PASS, --authfile, or log "
                                      "in with skopeo/docker)")
        raise RegistryAuthError(f"{what}: {self.host} denies access to {self.repo} {who}"
                                f"{': ' + detail if detail else ''}{hint}")

    def _ping(self) -> str:
        """GET /v2/: picks the scheme and learns how the registry authenticates."""
        schemes = ["https"] if self.options.tls_verify else ["https", "http"]
        what = f"registry {self.host}"
        for i, scheme in enumerate(schemes):
            self.base = f"{scheme}://{self.api_host}"
            url = f"{self.base}/v2/"
            if i + 1 < len(schemes):
                # May the server speak plain http? One quick try decides.
                try:
                    resp = self._send("GET", url, {"User-Agent": USER_AGENT})
                except (SSLError, urllib3.exceptions.ProtocolError) as exc:
                    log.debug("%s: https failed (%s); trying http", what, _exc_text(exc))
                    continue
                except (HTTPError, OSError):
                    pass  # refused / unreachable: let the retrying path report it
                else:
                    self._discard(resp)
            resp = self.request("GET", url, what, auth=True)
            body = self._discard(resp)
            if resp.status == 200:
                return self.base
            if resp.status == 404:
                raise RegistryError(f"{what} does not serve the registry API (GET /v2/ is 404)")
            raise RegistryError(f"{what}: GET /v2/ answered HTTP {resp.status}: "
                                f"{_registry_errors(body)}")
        raise AssertionError("unreachable")

    def _authenticate(self, header: str, sent: str | None, what: str, detail: str) -> bool:
        """Answer a 401's challenge; False if there is nothing more to try."""
        with self._lock:
            if self._authorization and self._authorization != sent:
                return True  # another thread already refreshed it
            challenges = dict(parse_www_authenticate(header))
            if "bearer" in challenges:
                self._authorization = "Bearer " + self._fetch_token(challenges["bearer"], what)
                return True
            if "basic" in challenges:
                if not self.creds:
                    raise RegistryAuthError(
                        f"{what}: {self.host} requires credentials (pass --username with "
                        f"--password-stdin or ${PASSWORD_ENV}, --creds USER:PASS, or "
                        "--authfile, or log in with skopeo/docker)")
                if sent and sent.startswith("Basic "):
                    raise RegistryAuthError(f"{what}: {self.host} rejected the credentials "
                                            f"of {self.creds[0]}{': ' + detail if detail else ''}")
                token = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
                self._authorization = f"Basic {token}"
                return True
            if not header:
                return False
            raise RegistryAuthError(f"{what}: {self.host} asks for an unsupported "
                                    f"authentication: {header[:80]}")

    def _fetch_token(self, params: dict[str, str], what: str) -> str:
        realm = params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise RegistryAuthError(f"{what}: the registry's Bearer challenge names no usable realm")
        if urlsplit(realm).scheme == "http" and self.options.tls_verify:
            raise RegistryAuthError(
                f"{what}: the registry's token service {realm[:100]} is plain http; with TLS "
                "verification on casfs asks for tokens only over https "
                "(--tls-verify=false allows it)")
        scope = params.get("scope") or f"repository:{self.repo}:pull"
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for s in scope.split():
            query.append(("scope", s))
        if self.creds:
            query.append(("account", self.creds[0]))
        url = realm + ("&" if "?" in realm else "?") + urlencode(query)
        basic = None
        if self.creds:
            raw = base64.b64encode(f"{self.creds[0]}:{self.creds[1]}".encode()).decode()
            basic = f"Basic {raw}"
        token_what = f"token service {urlsplit(realm).netloc}"
        resp = self.request("GET", url, token_what, auth=False, credentials=basic)
        body = _read_limited(resp, 1 << 20, token_what)
        if resp.status in (401, 403):
            who = f"the credentials of {self.creds[0]}" if self.creds else "anonymous access"
            raise RegistryAuthError(f"{what}: {token_what} refused {who} for {scope}"
                                    f"{': ' + _registry_errors(body) if body else ''}")
        if resp.status != 200:
            raise RegistryAuthError(f"{what}: {token_what} answered HTTP {resp.status}: "
                                    f"{_registry_errors(body)}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAuthError(f"{what}: {token_what} gave no token")
        return token

    # -- the API -------------------------------------------------------------------

    def _get_small(self, url: str, what: str, accept: str | None = None,
                   limit: int = MAX_JSON) -> tuple[urllib3.BaseHTTPResponse, bytes]:
        """GET a small document whole (a manifest, a config), retried as a whole if the
        connection drops while its body is read."""
        headers = {"Accept": accept} if accept else {}
        attempt = 0
        while True:
            resp = self.request("GET", url, what, headers)
            try:
                return resp, _read_limited(resp, limit, what)
            except RegistryError as exc:
                if attempt >= self.options.retries or not isinstance(exc.__cause__, (HTTPError, OSError)):
                    raise
                log.info("%s: %s; retrying", what, exc)
                self._sleep_backoff(attempt)
                attempt += 1

    def _not_found(self, status: int, body: bytes, what: str, ref: str) -> ImageError:
        detail = _registry_errors(body)
        if status == 404:
            return ImageNotFound(f"{what} not found: {self.host}/{self.repo} has no {ref}"
                                 f"{' (' + detail + ')' if detail else ''}")
        return RegistryError(f"{what}: HTTP {status}{': ' + detail if detail else ''}")

    def get_manifest(self, reference: str, what: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, checked against its digest."""
        url = f"{self.base}/v2/{self.repo}/manifests/{reference}"
        resp, body = self._get_small(url, what, ACCEPT_MANIFESTS)
        if resp.status != 200:
            raise self._not_found(resp.status, body, what, f"manifest {reference}"
                                  if _DIGEST_RE.fullmatch(reference) else f"tag {reference!r}")
        media_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        if _DIGEST_RE.fullmatch(reference):
            check_digest(reference, body, f"manifest {reference} from {self.host}")
            digest = reference
        else:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            claimed = resp.headers.get("Docker-Content-Digest", "")
            if claimed.startswith("sha256:") and claimed != digest:
                raise LayerDigestMismatch(f"{what}: the manifest {self.host} sent for "
                                          f"{reference} does not match the digest it claims "
                                          f"({claimed}; its bytes hash to {digest})")
        return body, media_type, digest

    def get_blob_small(self, digest: str, what: str, limit: int = MAX_CONFIG) -> bytes:
        url = f"{self.base}/v2/{self.repo}/blobs/{digest}"
        resp, body = self._get_small(url, what, limit=limit)
        if resp.status != 200:
            raise self._not_found(resp.status, body, what, f"blob {digest}")
        check_digest(digest, body, what)
        return body

    def open_blob(self, digest: str, size: int, what: str) -> io.BufferedReader:
        """A stream of a blob's bytes, verified against `digest` as they pass."""
        return io.BufferedReader(BlobStream(self, digest, size, what), READ_SIZE)


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL, the port made explicit (a bad one is -1)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = -1
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def _exc_text(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None)
    text = str(reason or exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _read_limited(resp: urllib3.BaseHTTPResponse, limit: int, what: str) -> bytes:
    try:
        data = resp.read(limit + 1)
    except (HTTPError, OSError) as exc:
        resp.close()
        resp.release_conn()
        raise RegistryError(f"{what}: the connection broke while reading: {_exc_text(exc)}") from exc
    if len(data) > limit:
        resp.close()
        resp.release_conn()
        raise ImageError(f"{what} is larger than {limit} bytes")
    resp.release_conn()
    return data


class BlobStream(io.RawIOBase):
    """A registry blob, streamed: a dropped connection resumes with a Range request at the
    offset reached; the bytes are hashed as they are handed out and the hash checked at the
    end (LayerDigestMismatch). Bytes beyond the descriptor's size fail at once."""

    def __init__(self, client: RegistryClient, digest: str, size: int, what: str) -> None:
        algo, _, self._want = digest.partition(":")
        if algo not in ("sha256", "sha512") or not _DIGEST_RE.fullmatch(digest):
            raise ImageError(f"{what}: unsupported digest {digest!r}")
        self.client = client
        self.digest = digest
        self.size = size
        self.what = what
        self.url = f"{client.base}/v2/{client.repo}/blobs/{digest}"
        self._hash = hashlib.new(algo)
        self.pos = 0
        self.resumes = 0
        self._resp: urllib3.BaseHTTPResponse | None = None
        self._failures = 0  # consecutive failures without progress
        self._done = False

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}
        if self.pos:
            headers["Range"] = f"bytes={self.pos}-"
        resp = self.client.request("GET", self.url, self.what, headers)
        if resp.status not in (200, 206):
            body = RegistryClient._discard(resp)
            raise self.client._not_found(resp.status, body, self.what, f"blob {self.digest}")
        if resp.status == 200:
            length = resp.headers.get("Content-Length")
            if self.size >= 0 and length and length.isdigit() and int(length) != self.size:
                resp.close()
                resp.release_conn()
                raise LayerDigestMismatch(f"{self.what}: the registry sends {length} bytes for "
                                          f"blob {self.digest}, whose descriptor says {self.size}")
            skip = self.pos  # the server ignored Range: skip what was read already
            while skip:
                data = resp.read(min(skip, READ_SIZE))
                if not data:
                    raise urllib3.exceptions.ProtocolError("blob ended before the resume offset")
                skip -= len(data)
        else:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != self.pos:
                resp.close()
                resp.release_conn()
                raise RegistryError(f"{self.what}: the registry answered a Range request at "
                                    f"{self.pos} with {resp.headers.get('Content-Range')!r}")
        self._resp = resp

    def _broken(self, exc: BaseException | str) -> None:
        self._drop()
        self._failures += 1
        self.resumes += 1
        if self._failures > self.client.options.retries or self.resumes > self.client.options.max_resumes:
            raise RegistryError(f"{self.what}: the download of {self.digest} kept breaking "
                                f"at byte {self.pos}: {_exc_text(exc) if isinstance(exc, BaseException) else exc}")
        log.info("%s: download broke at byte %d (%s); resuming", self.what, self.pos,
                 exc if isinstance(exc, str) else _exc_text(exc))
        self.client._sleep_backoff(self._failures - 1)

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp.release_conn()
            self._resp = None

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._done or not len(b):
            return 0
        while True:
            try:
                if self._resp is None:
                    self._open()
                assert self._resp is not None
                # read1: whatever has arrived (a read(n) that breaks loses its partial data,
                # and a resume should start from the last byte received).
                data = self._resp.read1(min(len(b), READ_SIZE))
            except (HTTPError, OSError) as exc:
                self._broken(exc)
                continue
            if not data:
                if self.size >= 0 and self.pos < self.size:
                    self._broken(f"the stream ended at byte {self.pos} of {self.size}")
                    continue
                self._finish()
                return 0
            n = len(data)
            if self.size >= 0 and self.pos + n > self.size:
                self._drop()
                raise LayerDigestMismatch(f"{self.what}: blob {self.digest} is longer than the "
                                          f"{self.size} bytes its descriptor gives")
            self._hash.update(data)
            self.pos += n
            self._failures = 0
            b[:n] = data
            return n

    def _finish(self) -> None:
        self._drop()
        self._done = True
        got = self._hash.hexdigest()
        if got != self._want:
            raise LayerDigestMismatch(
                f"{self.what}: the bytes {self.client.host} sent for {self.digest} do not match "
                f"that digest (they hash to {self._hash.name}:{got})")

    def close(self) -> None:
        self._drop()
        super().close()


# --- an image from a registry -------------------------------------------------------


def open_registry_image(ref: ImageRef, platform: str | None = None,
                        options: RegistryOptions | None = None) -> Image:
    client = RegistryClient(ref.host, ref.repository, options)
    where = f"{ref.host}/{ref.repository}"
    reference = ref.reference
    what = f"image {ref}"
    body, media_type, digest = client.get_manifest(reference, what)
    for depth in range(5):
        doc = parse_json_object(body, f"manifest {digest} from {where}")
        media_type = str(doc.get("mediaType") or media_type)
        if media_type in SCHEMA1_TYPES or doc.get("schemaVersion") == 1:
            raise ImageError(f"{what}: Docker schema 1 manifests are not supported "
                             "(re-push the image with a current client)")
        if not (media_type in INDEX_TYPES or "manifests" in doc):
            break
        if depth == 4:
            raise ImageError(f"{what}: image indexes nested too deep")
        desc = pick_platform(doc, platform, f"image index {digest} of {where}")
        body, media_type, digest = client.get_manifest(desc["digest"], what)
        media_type = media_type or str(desc.get("mediaType") or "")
    manifest_what = f"manifest {digest} of {where}"
    if not isinstance(doc.get("config"), dict):
        raise ImageError(f"{manifest_what} has no config")
    config_desc = descriptor(doc["config"], manifest_what)
    config = parse_json_object(
        client.get_blob_small(config_desc["digest"], f"config {config_desc['digest']} of {where}"),
        "image config")
    diff_ids = config_diff_ids(config, "image config")
    layer_descs = [descriptor(d, manifest_what) for d in json_list(doc, "layers", manifest_what)]
    layers = []
    for i, ld in enumerate(layer_descs):
        d, size = ld["digest"], ld.get("size", -1)
        if not _DIGEST_RE.fullmatch(d):
            raise ImageError(f"{manifest_what}: bad layer digest {d!r}")
        layer_what = f"layer {i + 1}/{len(layer_descs)} ({d[:19]}) of {where}"
        layers.append(Layer(
            digest=d,
            media_type=str(ld.get("mediaType", "")),
            size=size,
            open=functools.partial(client.open_blob, d, size, layer_what),
            diff_id=diff_ids[i] if i < len(diff_ids) else "",
            verifies_digest=True,
        ))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_desc["digest"], digest, layers, plat)
