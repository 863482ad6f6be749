"""Image references in skopeo's transport syntax: `oci:<dir>[:<tag>]`,
`docker-archive:<file.tar>`, `docker://<host>/<repo>[:<tag>|@<digest>]`."""

from __future__ import annotations

from dataclasses import dataclass

from casfs.errors import BadImageRef


@dataclass(frozen=True)
class ImageRef:
    transport: str  # "oci", "docker-archive" or "docker"
    location: str  # a directory, a file, or host/repo
    tag: str | None = None

    def __str__(self) -> str:
        sep = "//" if self.transport == "docker" else ""
        tag = f":{self.tag}" if self.tag else ""
        return f"{self.transport}:{sep}{self.location}{tag}"


def parse_image_ref(text: str) -> ImageRef:
    transport, sep, rest = text.partition(":")
    if not sep or not rest:
        raise BadImageRef(f"bad image reference {text!r}: use oci:<dir>[:<tag>], "
                          "docker-archive:<file.tar> or docker://<host>/<repo>:<tag>")
    if transport == "oci":
        path, _, tag = rest.partition(":")
        return ImageRef("oci", path, tag or None)
    if transport == "docker-archive":
        path, _, ref = rest.partition(":")
        return ImageRef("docker-archive", path, ref or None)
    if transport == "docker":
        if not rest.startswith("//") or len(rest) <= 2:
            raise BadImageRef(f"bad image reference {text!r}: use docker://<host>/<repo>:<tag>")
        return ImageRef("docker", rest[2:])
    raise BadImageRef(f"unknown transport {transport!r} in {text!r} "
                      "(supported: oci:, docker-archive:, docker://)")
