"""The store's key layout: every kind of object the store holds, the key each is kept
under, and the parsing of a key back into its kind and fields.

This module is the one place that knows how keys look (docs/format.md, "Store
format"); everything else builds keys with the functions here and reads listings
through `parse_key`. The layout, version 1 of the store format:

    casfs-store.json                       the store marker
    blobs/<hh>/<hex>                       a blob; <hh> = <hex>[:2]
    manifests/<hex>                        a manifest
    tags/<name>                            a tag (names: TAG_NAME below)
    layers/<algo>/<hex>                    a layer record, keyed by the layer digest
    packidx/<algo>/<hex>                   a layer's pack index, keyed likewise
    packs/<hex>                            a pack
    traces/m/<manifest>/<id>               a boot trace of a manifest
    traces/l/<layer hex>/<manifest>.<id>   a trace pointer (the layer digest's hex
                                           only: the format stores no algorithm)
    locks/<holder>-<unix s>-<12 hex>       a lock (casfs.store.locks)

`<hex>`, `<manifest>`: BLAKE3-256, 64 lowercase hex characters. Layer digests are
OCI digests, `sha256:<64 hex>` or `sha512:<128 hex>`. The recorder names traces
`<unix ms, 13 digits>-<8 hex>`, so that they sort by time; readers accept any id of
TRACE_ID (letters, digits, `_`, `-`), which is all a key's safety needs (no `/`,
no `.`, which separates a pointer's manifest from its id).

Builders trust their arguments (digests the caller holds, already checked where
they came in), because some run once per chunk on the read path; tag names and
trace ids, which arrive from users and recorders, are checked. `parse_key`
trusts nothing: a listing of a damaged or hostile store can hold any key, and a
key that is not one of the layout's comes back as `BadKey`, never as an
exception from deeper down.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from casfs.errors import BadKey


class Kind(enum.StrEnum):
    """What a key holds. The values are the names reports use (`casfs gc`, `check`)."""

    MARKER = "marker"
    BLOB = "blobs"
    MANIFEST = "manifests"
    TAG = "tags"
    LAYER_RECORD = "layers"
    PACK_INDEX = "packidx"
    PACK = "packs"
    TRACE = "traces"
    TRACE_POINTER = "trace-pointers"
    LOCK = "locks"


STORE_MARKER = "casfs-store.json"

# The prefix to list for every object of a kind (the marker is a single key).
PREFIXES: dict[Kind, str] = {
    Kind.BLOB: "blobs/",
    Kind.MANIFEST: "manifests/",
    Kind.TAG: "tags/",
    Kind.LAYER_RECORD: "layers/",
    Kind.PACK_INDEX: "packidx/",
    Kind.PACK: "packs/",
    Kind.TRACE: "traces/m/",
    Kind.TRACE_POINTER: "traces/l/",
    Kind.LOCK: "locks/",
}

# A tag name: one or more segments joined by "/" (registry-style names such as
# registry.example/team/app:1.2), each starting with a letter, digit or "_" (so never "."
# or ".."), at most 255 characters in all. In a key each "/" is written "%2F": a tag is
# always one key right under tags/, whatever its name.
_TAG_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_.:@+-]*"
TAG_NAME = re.compile(rf"(?=.{{1,255}}$){_TAG_SEGMENT}(?:/{_TAG_SEGMENT})*")
_TAG_SLASH = "%2F"
TRACE_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
LOCK_NAME = re.compile(r"([a-z]+)-([0-9]{1,12})-([0-9a-f]{12})")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LAYER_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
_ANY_LAYER_HEX = re.compile(r"[0-9a-f]{64}|[0-9a-f]{128}")


# -- building -------------------------------------------------------------------------


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


def manifest_key(digest: str) -> str:
    return f"manifests/{digest}"


def tag_key(name: str) -> str:
    return "tags/" + validate_tag(name).replace("/", _TAG_SLASH)


def layer_record_key(layer_digest: str) -> str:
    """`layers/sha256/<hex>` for the layer `sha256:<hex>`."""
    algo, _, hex_ = layer_digest.partition(":")
    return f"layers/{algo}/{hex_}"


def pack_index_key(layer_digest: str) -> str:
    """`packidx/sha256/<hex>` for the layer `sha256:<hex>`."""
    algo, _, hex_ = layer_digest.partition(":")
    return f"packidx/{algo}/{hex_}"


def pack_key(digest: str) -> str:
    return f"packs/{digest}"


def traces_prefix(manifest: str) -> str:
    """The prefix listing a manifest's traces (the rest of each key is its id)."""
    return f"traces/m/{manifest}/"


def trace_key(manifest: str, trace_id: str) -> str:
    if not TRACE_ID.fullmatch(trace_id):
        raise BadKey(f"invalid trace id {trace_id!r}")
    return f"{traces_prefix(manifest)}{trace_id}"


def _layer_hex(layer_digest: str) -> str:
    # Pointers are keyed by the hex alone; a bare hex is taken as it is.
    return layer_digest.partition(":")[2] or layer_digest


def layer_traces_prefix(layer_digest: str) -> str:
    """The prefix listing the trace pointers of a layer (`sha256:<hex>` or `<hex>`)."""
    return f"traces/l/{_layer_hex(layer_digest)}/"


def trace_pointer_key(layer_digest: str, manifest: str, trace_id: str) -> str:
    if not TRACE_ID.fullmatch(trace_id):
        raise BadKey(f"invalid trace id {trace_id!r}")
    return f"{layer_traces_prefix(layer_digest)}{manifest}.{trace_id}"


def locks_prefix(holder: str) -> str:
    """The prefix listing the locks of one holder kind (`index`, `gc`)."""
    return f"locks/{holder}-"


def lock_key(holder: str, unix_seconds: int, token: str) -> str:
    key = f"{locks_prefix(holder)}{unix_seconds}-{token}"
    if not LOCK_NAME.fullmatch(key[len("locks/"):]):
        raise BadKey(f"invalid lock key {key!r}")
    return key


def validate_tag(name: str) -> str:
    if not TAG_NAME.fullmatch(name):
        raise BadKey(f"invalid tag name {name!r} (segments of letters, digits and _.:@+-, "
                     "joined by /, at most 255 characters)")
    return name


# -- parsing --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A key taken apart. Fields a kind does not have are empty."""

    kind: Kind
    key: str
    digest: str = ""  # blob, manifest, pack: the object's own digest
    layer: str = ""  # layer record, pack index: `algo:hex`; trace pointer: the hex alone
    manifest: str = ""  # trace, trace pointer: the manifest the trace was recorded on
    trace_id: str = ""  # trace, trace pointer
    name: str = ""  # tag: its name; lock: its holder kind (`index`, `gc`)

    @property
    def trace(self) -> str:
        """For a trace pointer, the key of the trace it points at."""
        return f"{traces_prefix(self.manifest)}{self.trace_id}"


def _bad(key: str, why: str) -> BadKey:
    return BadKey(f"{key!r} is not a store key: {why}")


def _digest(key: str, text: str, what: str) -> str:
    if not _HEX64.fullmatch(text):
        raise _bad(key, f"{what} is not a 64-hex BLAKE3 digest")
    return text


def _layer(key: str, algo: str, hex_: str) -> str:
    pattern = _LAYER_HEX.get(algo)
    if pattern is None or not pattern.fullmatch(hex_):
        raise _bad(key, "not a sha256 or sha512 layer digest")
    return f"{algo}:{hex_}"


def parse_key(key: str) -> ParsedKey:
    """The kind and fields of a key; raises BadKey for anything the layout does not hold."""
    if key == STORE_MARKER:
        return ParsedKey(Kind.MARKER, key)
    parts = key.split("/")
    head, n = parts[0], len(parts)
    if head == "blobs" and n == 3:
        digest = _digest(key, parts[2], "blob name")
        if parts[1] != digest[:2]:
            raise _bad(key, "blob in the wrong directory")
        return ParsedKey(Kind.BLOB, key, digest=digest)
    if head == "manifests" and n == 2:
        return ParsedKey(Kind.MANIFEST, key, digest=_digest(key, parts[1], "manifest name"))
    if head == "packs" and n == 2:
        return ParsedKey(Kind.PACK, key, digest=_digest(key, parts[1], "pack name"))
    if head == "tags" and n == 2:
        name = parts[1].replace(_TAG_SLASH, "/")
        if not TAG_NAME.fullmatch(name):
            raise _bad(key, "invalid tag name")
        return ParsedKey(Kind.TAG, key, name=name)
    if head in ("layers", "packidx") and n == 3:
        kind = Kind.LAYER_RECORD if head == "layers" else Kind.PACK_INDEX
        return ParsedKey(kind, key, layer=_layer(key, parts[1], parts[2]))
    if head == "traces" and n == 4 and parts[1] == "m":
        if not TRACE_ID.fullmatch(parts[3]):
            raise _bad(key, "invalid trace id")
        return ParsedKey(Kind.TRACE, key, manifest=_digest(key, parts[2], "manifest"),
                         trace_id=parts[3])
    if head == "traces" and n == 4 and parts[1] == "l":
        manifest, _, trace_id = parts[3].partition(".")
        if not _ANY_LAYER_HEX.fullmatch(parts[2]):
            raise _bad(key, "invalid layer digest")
        if not TRACE_ID.fullmatch(trace_id):
            raise _bad(key, "invalid trace id")
        return ParsedKey(Kind.TRACE_POINTER, key, layer=parts[2],
                         manifest=_digest(key, manifest, "manifest"), trace_id=trace_id)
    if head == "locks" and n == 2:
        match = LOCK_NAME.fullmatch(parts[1])
        if match is None:
            raise _bad(key, "invalid lock name")
        return ParsedKey(Kind.LOCK, key, name=match.group(1))
    raise _bad(key, "no kind of object is kept there")


def try_parse_key(key: str) -> ParsedKey | BadKey:
    """parse_key, with the failure returned rather than raised (for listing loops)."""
    try:
        return parse_key(key)
    except BadKey as exc:
        return exc
