"""Image references in skopeo's transport syntax: `oci:<dir>[:<tag>]`,
`docker-archive:<file.tar>`, `docker://<host>/<repo>[:<tag>][@<digest>]`; and casfs's own
`tree:<path>`, a plain directory indexed as it is (indexer.tree; not skopeo's `dir:`,
which is an image stored as files). Everything after `tree:` is the path, colons included.

A docker reference follows the distribution grammar: the first path component is the
registry host when it holds a '.' or ':' or is `localhost` (otherwise the image is on
Docker Hub, `docker.io`, and a one-component name lives under `library/`); the tag
defaults to `latest`; a digest, when given, is what is fetched (a tag beside it is only
informative, as in docker).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from casfs.errors import BadImageRef

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_RE = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])"
                      r"(?::[0-9]{1,5})?")


@dataclass(frozen=True)
class ImageRef:
    transport: str  # "oci", "docker-archive", "docker" or "tree"
    location: str  # a directory, a file, or host/repo
    tag: str | None = None
    digest: str | None = None  # docker only: "sha256:<hex>"

    def __str__(self) -> str:
        sep = "//" if self.transport == "docker" else ""
        tag = f":{self.tag}" if self.tag else ""
        digest = f"@{self.digest}" if self.digest else ""
        return f"{self.transport}:{sep}{self.location}{tag}{digest}"

    @property
    def host(self) -> str:
        """The registry host[:port] of a docker reference."""
        return self.location.partition("/")[0]

    @property
    def repository(self) -> str:
        """The repository path inside the registry of a docker reference."""
        return self.location.partition("/")[2]

    @property
    def reference(self) -> str:
        """What to ask the registry for: the digest if given, else the tag."""
        return self.digest or self.tag or "latest"


_DOCKER_USAGE = "use docker://<host>/<repo>[:<tag>|@sha256:<digest>]"


def parse_docker_ref(text: str, rest: str) -> ImageRef:
    """`rest` is what follows `docker://`."""
    name, at, digest = rest.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        raise BadImageRef(f"bad digest {digest!r} in image reference {text!r}: "
                          "use @sha256:<64 hex digits>")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG_RE.fullmatch(tag):
            raise BadImageRef(f"bad tag {tag!r} in image reference {text!r}")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, repo = first, remainder
        if not _HOST_RE.fullmatch(host):
            raise BadImageRef(f"bad registry host {host!r} in image reference {text!r}")
    else:
        host, repo = DOCKER_HUB, name
        if "/" not in repo:
            repo = f"library/{repo}"
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = DOCKER_HUB
    if not repo or not _REPO_RE.fullmatch(repo):
        raise BadImageRef(f"bad repository name {repo!r} in image reference {text!r}: "
                          "lowercase letters, digits and separators (. _ __ -), "
                          f"components joined by '/'; {_DOCKER_USAGE}")
    if tag is None and not digest:
        tag = "latest"
    return ImageRef("docker", f"{host}/{repo}", tag, digest or None)


def parse_image_ref(text: str) -> ImageRef:
    transport, sep, rest = text.partition(":")
    if not sep or not rest:
        raise BadImageRef(f"bad image reference {text!r}: use oci:<dir>[:<tag>], "
                          "docker-archive:<file.tar>, docker://<host>/<repo>:<tag> "
                          "or tree:<directory>")
    if transport == "oci":
        path, _, tag = rest.partition(":")
        return ImageRef("oci", path, tag or None)
    if transport == "docker-archive":
        path, _, ref = rest.partition(":")
        return ImageRef("docker-archive", path, ref or None)
    if transport == "docker":
        if not rest.startswith("//") or len(rest) <= 2:
            raise BadImageRef(f"bad image reference {text!r}: {_DOCKER_USAGE}")
        return parse_docker_ref(text, rest[2:])
    if transport == "tree":
        return ImageRef("tree", rest)
    raise BadImageRef(f"unknown transport {transport!r} in {text!r} "
                      "(supported: oci:, docker-archive:, docker://, tree:)")
