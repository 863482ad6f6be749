"""Write an image's metadata tree (a casfs manifest) as an EROFS image for kernel serving.

The image carries no file content. Every non-empty regular file is an overlayfs
*metacopy* inode: it has its real size, a chunk map whose entries are all holes,
and the xattrs ``trusted.overlay.metacopy`` (empty) and ``trusted.overlay.redirect``
(the absolute path of the file's content object), so that overlayfs, mounted with
``metacopy=on,redirect_dir=follow,lowerdir=<this image>::<objects>::...``, reads
the content from its data-only layers. Everything else (directories, symlinks,
devices, fifos, sockets, empty files, ownership, modes, nanosecond mtimes,
hardlinks, xattrs) is in the image itself. docs/format.md ("EROFS image") is the
specification of what is written; format.py holds the on-disk structures.

The build reads the manifest's tables in bulk and makes three passes: every
directory (names checked, "." and ".." added, entries cut into blocks), every
inode (kind, size, xattr entries), then every inode again in inode-number order,
appending its 32- or 64-byte inode, xattrs and inline tail to the metadata area,
which fixes its nid; a last pass over directories only writes their entries, now
that every nid is known. Image order: block 0 (superblock at 1024, inodes right
after it), inodes, shared xattrs (block-aligned), data blocks (directory blocks
and long symlink targets). The output depends only on the manifest and the
options: the same manifest always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import operator
import os
import stat
import struct
import tempfile
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, chain
from operator import itemgetter
from typing import BinaryIO

import blake3

from casfs.erofs import format as fmt
from casfs.erofs.checks import (
    MAX_OBJECT_PATH,
    MAX_SYMLINK,
    OVERLAY_XATTR_ALLOWANCE,
    device_reason,
    encode_rdev,
    xattr_budget,
    xattr_key,
    xattr_reason,
)
from casfs.errors import ErofsUnsupported, ManifestError
from casfs.manifest.layout import DIRENT, INODE, XATTR, section_offsets
from casfs.manifest.reader import ROOT_INO, Manifest

EROFS_LAYOUT_VERSION = 1
"""Bumped whenever the bytes written for the same manifest and options change,
so node caches can key images by (manifest digest, layout version, options)."""

ObjectPath = Callable[[int], bytes]

# A directory's last block, or a symlink target, of at most this many bytes is stored
# right after its inode; a longer one gets a data block of its own. Inline data must
# not cross a block boundary, so an inode is sometimes padded to start its tail in the
# next block: capping the tail at half a block caps that waste.
INLINE_MAX = fmt.BLOCK_SIZE // 2
# Where inodes start: right after the 128-byte superblock in block 0, slot-aligned.
META_START = fmt.SUPER_OFFSET + fmt.SUPERBLOCK.size
BLOCK_MASK = fmt.BLOCK_SIZE - 1
SLOT_MASK = fmt.SLOT_SIZE - 1

_OVERLAY = b"trusted.overlay."
_OVERLAY_ESCAPED = b"trusted.overlay.overlay."
_METACOPY_ENTRY = fmt.XATTR_ENTRY.pack(16, fmt.XATTR_INDEX_TRUSTED, 0) + b"overlay.metacopy"
_PAD = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length % 4


@dataclass(frozen=True)
class ErofsInfo:
    """What build_erofs wrote."""

    layout_version: int
    image_size: int  # bytes, a whole number of blocks
    blocks: int
    inodes: int  # EROFS inodes (a hardlinked file is one)
    directories: int
    regular_files: int  # non-empty regular files: metacopy inodes redirecting to an object
    empty_files: int
    symlinks: int
    devices: int  # character and block devices
    fifos: int
    sockets: int
    dirents: int  # names in directories, "." and ".." not counted
    hardlinked_inodes: int  # inodes with more than one name
    compact_inodes: int  # 32-byte inodes (the rest are 64-byte extended ones)
    xattrs: int  # xattrs written, the overlay ones included, counted per inode
    shared_xattrs: int  # distinct xattrs stored once in the shared area
    # nids[ino]: the EROFS inode number (nid; st_ino on the mount) of manifest inode ino
    # (index 0 unused). Inodes are written in manifest order, so nids only grow.
    nids: array = field(default_factory=lambda: array("I"), repr=False, compare=False)


def build_erofs(
    manifest: Manifest,
    out: BinaryIO | str | os.PathLike[str],
    *,
    object_path: ObjectPath,
    drop_security_xattrs: bool = False,
) -> ErofsInfo:
    """Write manifest's tree as an EROFS image to out (a binary file object, or a
    path written atomically: a temp file beside it renamed into place).

    object_path(ino) is the redirect of each non-empty regular file: an absolute
    path (bytes) of its content object in overlayfs's data-only layers. With
    drop_security_xattrs no security.* xattr is written.

    Raises ErofsUnsupported when the manifest holds something the image cannot
    represent faithfully (kernel_mode_obstacle names it before a build), and
    ManifestError when the manifest's structure is broken. Does not refuse a
    0/0 character device (a valid EROFS entry, but an overlayfs whiteout): see
    kernel_mode_obstacle.
    """
    parts, info = _Build(manifest, object_path, drop_security_xattrs).run()
    if isinstance(out, (str, os.PathLike)):
        _write_atomically(os.fspath(out), parts)
    else:
        for part in parts:
            out.write(part)
    return info


def render_erofs(
    manifest: Manifest, *, object_path: ObjectPath, drop_security_xattrs: bool = False
) -> tuple[bytearray, ErofsInfo]:
    """The image bytes and their summary (build_erofs without the writing)."""
    parts, info = _Build(manifest, object_path, drop_security_xattrs).run()
    image = parts[0]
    for part in parts[1:]:
        image += part
    return image, info


def _write_atomically(path: str, parts: list[bytearray]) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".erofs-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _escape_xattr_name(name: bytes) -> bytes:
    # overlayfs (>= 6.7) shows a lower layer's trusted.overlay.overlay.X as
    # trusted.overlay.X and treats unescaped trusted.overlay.* as its own metadata.
    if name.startswith(_OVERLAY):
        return _OVERLAY_ESCAPED + name[len(_OVERLAY):]
    return name


_S_IFMT = 0o170000
_ZEROS = bytes(fmt.BLOCK_SIZE + fmt.SLOT_SIZE)
_U32 = struct.Struct("<I")


class _Build:
    """One build. Per-inode state lives in lists indexed by manifest inode number
    (index 0 unused), so no Python object is made per inode beyond the manifest's
    own record tuples."""

    def __init__(self, m: Manifest, object_path: ObjectPath, drop_security: bool) -> None:
        self.m = m
        self.object_path = object_path
        self.drop_security = drop_security
        n = self.n = m.n_inodes
        _meta, o_ino, o_dir, o_chunk, o_xattr, o_str = section_offsets(
            m.meta_len, n, m.n_dirents, m.n_chunks, m.n_xattrs)
        buf = m.buf
        self.inodes: list[tuple[int, ...]] = [(0,) * 14, *INODE.iter_unpack(buf[o_ino:o_dir])]
        self.dirents = list(DIRENT.iter_unpack(buf[o_dir:o_chunk]))
        self.mxattrs = list(XATTR.iter_unpack(buf[o_xattr:o_str]))
        self.strings = bytes(buf[o_str:o_str + m.strings_len])
        self.kind = [rec[0] & _S_IFMT for rec in self.inodes]
        self.size = [0] * (n + 1)  # i_size as written
        self.parent = [0] * (n + 1)
        # Directory contents: ino -> (names, children, first index of each block, bytes
        # used in the last block). A child of 0 stands for the directory's parent.
        self.dirs: dict[int, tuple[list[bytes], list[int], list[int], int]] = {}
        self.entries: list[list[bytes] | None] = [None] * (n + 1)  # xattr entries, encoded
        self.target: dict[int, bytes] = {}
        self.rdev: dict[int, int] = {}
        self.counts: Counter[str] = Counter()

    def run(self) -> tuple[list[bytearray], ErofsInfo]:
        self._read_directories()
        self._read_inodes()
        meta, data = self._write_inodes()
        self._write_directories(meta, data)
        blocks = (len(meta) + len(data)) >> fmt.BLOCK_BITS
        self._write_superblock(meta, blocks)
        c = self.counts
        info = ErofsInfo(
            layout_version=EROFS_LAYOUT_VERSION, image_size=blocks << fmt.BLOCK_BITS,
            blocks=blocks, inodes=self.n, directories=len(self.dirs),
            regular_files=c["reg"], empty_files=c["empty"], symlinks=c["lnk"],
            devices=c["dev"], fifos=c["fifo"], sockets=c["sock"], dirents=c["dirents"],
            hardlinked_inodes=c["hardlinked"], compact_inodes=c["compact"],
            xattrs=c["xattrs"], shared_xattrs=c["shared"], nids=array("I", self.nid))
        return [meta, data], info

    # -- reading the manifest ---------------------------------------------------------------

    def _read_directories(self) -> None:
        """Every directory's names (checked: EROFS looks names up by binary search, so
        they must be valid, unique and sorted), "." and ".." added in name order, the
        entries cut into blocks (each block: its dirents, then its names) and each
        subdirectory's parent found."""
        n, inodes, dirents, strings, kind = self.n, self.inodes, self.dirents, self.strings, self.kind
        n_dirents = len(dirents)
        if kind[ROOT_INO] != stat.S_IFDIR:
            raise ManifestError("manifest root is not a directory")
        parent, size, dirs = self.parent, self.size, self.dirs
        parent[ROOT_INO] = ROOT_INO
        has_parent = bytearray(n + 1)
        total = 0
        block = fmt.BLOCK_SIZE
        for ino in range(1, n + 1):
            if kind[ino] != stat.S_IFDIR:
                continue
            first, count = inodes[ino][7], inodes[ino][8]
            if first + count > n_dirents:
                raise ManifestError(f"inode {ino}: directory entries out of range")
            ents = dirents[first:first + count]
            names = [strings[o:o + ln] for o, ln, _r, _c in ents]
            children = [c for _o, _l, _r, c in ents]
            if count:
                lens = [ln for _o, ln, _r, _c in ents]
                if list(map(len, names)) != lens or min(children) < 1 or max(children) > n:
                    raise ManifestError(f"inode {ino}: directory entry out of range")
                joined = b"".join(names)
                if (min(lens) == 0 or max(lens) > fmt.NAME_LEN or b"/" in joined
                        or b"\0" in joined or not all(map(operator.lt, names, names[1:]))):
                    raise ManifestError(
                        f"inode {ino}: invalid, duplicate or unsorted entry names")
                for child in [c for c in children if kind[c] == stat.S_IFDIR]:
                    if child == ROOT_INO or has_parent[child]:
                        raise ManifestError(f"directory inode {child} has two parents")
                    has_parent[child] = 1
                    parent[child] = ino
            total += count
            for special, target in ((b".", ino), (b"..", 0)):
                at = bisect_left(names, special)
                if at < len(names) and names[at] == special:
                    raise ManifestError(f"inode {ino}: entry named {special!r}")
                names.insert(at, special)
                children.insert(at, target)
            # Greedy packing, as mkfs.erofs does: a block takes entries while they fit.
            ends = list(accumulate([12 + len(name) for name in names]))
            starts = [0]
            base = i = 0
            while True:
                i = bisect_right(ends, base + block, i)
                if i >= len(ends):
                    break
                starts.append(i)
                base = ends[i - 1]
            used = ends[-1] - base
            dirs[ino] = (names, children, starts, used)
            size[ino] = (len(starts) - 1) * block + used
        for ino in dirs:
            if not has_parent[ino]:
                parent[ino] = ROOT_INO  # the root, or unreachable: ".." must name a directory
        self.counts["dirents"] = total

    def _read_inodes(self) -> None:
        """Sizes, symlink targets, device numbers and encoded xattr entries of every inode;
        the object path of every non-empty regular file."""
        n, inodes, kind, size, strings = self.n, self.inodes, self.kind, self.size, self.strings
        entries_of, target, rdev = self.entries, self.target, self.rdev
        object_path = self.object_path
        n_strings = len(strings)
        reg_k, dir_k, lnk_k = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
        chr_k, blk_k, fifo_k, sock_k = stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK
        heads: dict[int, bytes] = {}  # redirect entry header (and name) by path length
        n_reg = n_empty = n_lnk = n_dev = n_fifo = n_sock = n_x = 0
        for ino in range(1, n + 1):
            rec = inodes[ino]
            k = kind[ino]
            entries: list[bytes] | None = None
            if rec[0] > 0xFFFF:
                raise ManifestError(f"inode {ino}: mode {rec[0]:o} out of range")
            if k == reg_k:
                sz = size[ino] = rec[4]
                if sz:
                    n_reg += 1
                    path = object_path(ino)
                    if (type(path) is not bytes or path[:1] != b"/"
                            or len(path) > MAX_OBJECT_PATH or b"\0" in path):
                        raise ErofsUnsupported(
                            f"inode {ino}: object path {path!r} is not an absolute path "
                            f"(bytes, no NUL, at most {MAX_OBJECT_PATH} bytes)")
                    head = heads.get(len(path))
                    if head is None:
                        head = heads[len(path)] = fmt.XATTR_ENTRY.pack(
                            16, fmt.XATTR_INDEX_TRUSTED, len(path)) + b"overlay.redirect"
                    entries = [_METACOPY_ENTRY, head + path + _PAD[len(path) & 3]]
                else:
                    n_empty += 1
            elif k == dir_k:
                pass
            elif k == lnk_k:
                str_off, length = rec[13], rec[8]
                if str_off + length > n_strings:
                    raise ManifestError(f"inode {ino}: symlink target out of range")
                if not 0 < length <= MAX_SYMLINK:
                    raise ErofsUnsupported(
                        f"inode {ino}: symlink target of {length} bytes (Linux allows 1 "
                        f"to {MAX_SYMLINK})")
                target[ino] = strings[str_off:str_off + length]
                size[ino] = length
                n_lnk += 1
            elif k in (chr_k, blk_k):
                reason = device_reason(rec[6])
                if reason:
                    raise ErofsUnsupported(f"inode {ino}: {reason}")
                rdev[ino] = encode_rdev(rec[6])
                n_dev += 1
            elif k == fifo_k:
                n_fifo += 1
            elif k == sock_k:
                n_sock += 1
            else:
                raise ManifestError(f"inode {ino}: unknown file type {k:o}")
            if rec[10]:
                entries = self._xattr_entries(ino, rec[9], rec[10], entries)
            if entries:
                entries_of[ino] = entries
                n_x += len(entries)
        seen = Counter(c for _o, _l, _r, c in self.dirents)
        self.counts.update(
            reg=n_reg, empty=n_empty, lnk=n_lnk, dev=n_dev, fifo=n_fifo, sock=n_sock,
            xattrs=n_x, hardlinked=sum(1 for c, times in seen.items()
                                       if times > 1 and kind[c] != dir_k))

    def _xattr_entries(self, ino: int, first: int, count: int,
                       entries: list[bytes] | None) -> list[bytes]:
        """The inode's encoded xattr entries (overlay ones first, if any), image xattrs
        escaped and checked: refused with ErofsUnsupported on what checks.py refuses."""
        mx, strings = self.mxattrs, self.strings
        if first + count > len(mx):
            raise ManifestError(f"inode {ino}: xattr reference out of range")
        out = list(entries or ())
        # The bound kernel_mode_obstacle applies too (checks.xattr_budget).
        budget = 12 + (OVERLAY_XATTR_ALLOWANCE if entries else 0)
        for name_off, name_len, _r, value_off, value_len in mx[first:first + count]:
            name = strings[name_off:name_off + name_len]
            value = strings[value_off:value_off + value_len]
            if len(name) != name_len or len(value) != value_len:
                raise ManifestError(f"inode {ino}: xattr out of range")
            if self.drop_security and name.startswith(b"security."):
                continue
            reason = xattr_reason(name, value)
            if reason:
                raise ErofsUnsupported(f"inode {ino}: {reason}")
            key = xattr_key(_escape_xattr_name(name))
            assert key is not None  # xattr_reason said so
            index, suffix = key
            budget += xattr_budget(name_len, value_len)
            entry = fmt.XATTR_ENTRY.pack(len(suffix), index, value_len) + suffix + value
            out.append(entry + _PAD[len(entry) & 3])
        if budget > fmt.XATTR_IBODY_MAX:
            raise ErofsUnsupported(
                f"inode {ino}: {budget} bytes of xattrs (EROFS holds at most "
                f"{fmt.XATTR_IBODY_MAX} per inode)")
        return out

    # -- writing --------------------------------------------------------------------------------

    def _write_inodes(self) -> tuple[bytearray, bytearray]:
        """The metadata area (block 0, inodes, shared xattrs) and the data area, except
        directory entries and the superblock; fixes every inode's nid."""
        n, inodes, kind, size, entries_of = self.n, self.inodes, self.kind, self.size, self.entries
        dirs, target, rdev = self.dirs, self.target, self.rdev
        # Shared xattrs: an entry (name and value) two or more inodes carry, such as
        # trusted.overlay.metacopy, is stored once and referenced by a 4-byte id.
        # The shared area starts on a block boundary, so ids are known now.
        uses = Counter(chain.from_iterable(e for e in entries_of if e))
        shared = sorted(e for e, c in uses.items() if c > 1)
        shared_id: dict[bytes, int] = {}
        shared_size = 0
        for e in shared:
            shared_id[e] = shared_size >> 2
            shared_size += len(e)
        if shared_size >> 2 > 0xFFFFFFFF:
            raise ErofsUnsupported("shared xattr area larger than 16 GiB")
        # Compact (32-byte) inodes have no mtime of their own: they show the superblock's
        # epoch. The image's most common mtime (not before 1970) becomes the epoch.
        mtimes = Counter(map(itemgetter(5), inodes[1:]))
        epoch_ns: int | None = None  # None: no compact inodes
        best = max((c for t, c in mtimes.items() if t >= 0), default=0)
        if best:
            epoch_ns = min(t for t, c in mtimes.items() if c == best and t >= 0)
        self.epoch_ns = epoch_ns or 0

        compact_pack = fmt.INODE_COMPACT.pack
        extended_pack = fmt.INODE_EXTENDED.pack
        xheader_pack = fmt.XATTR_IBODY_HEADER.pack
        u32_pack = _U32.pack
        reg_k, dir_k, lnk_k = stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK
        chr_k, blk_k = stat.S_IFCHR, stat.S_IFBLK
        inline_max, block, zeros = INLINE_MAX, fmt.BLOCK_SIZE, _ZEROS
        chunk_layout = (fmt.DATALAYOUT_CHUNK_BASED << fmt.DATALAYOUT_BIT)
        inline_layout = (fmt.DATALAYOUT_FLAT_INLINE << fmt.DATALAYOUT_BIT)
        no_shared = xheader_pack(0, 0)
        metacopy_id = shared_id.get(_METACOPY_ENTRY)
        metacopy_shared = metacopy_id is not None
        metacopy_head = xheader_pack(0, 1) + u32_pack(metacopy_id or 0)
        one_chunk_map = _U32.pack(fmt.NULL_ADDR32)

        meta = bytearray(META_START)  # block 0 up to the end of the superblock
        nid = self.nid = [0] * (n + 1)
        self.tail_pos: dict[int, int] = {}  # directory -> where its inline last block goes
        self.first_block: dict[int, int] = {}  # directory -> its first data block (relative)
        patches: list[tuple[int, int]] = []  # (inode position, relative data block) for i_u
        long_links: list[tuple[int, bytes]] = []  # (relative data block, target)
        n_data = n_compact = 0
        for ino in range(1, n + 1):
            rec = inodes[ino]
            k = kind[ino]
            sz = size[ino]
            entries = entries_of[ino]
            if entries:
                if (metacopy_shared and len(entries) == 2 and entries[0] is _METACOPY_ENTRY
                        and entries[1] not in shared_id):
                    # The common case, a plain file: shared metacopy, inline redirect.
                    xbody = metacopy_head + entries[1]
                elif shared_id:
                    ids: list[int] = []
                    inline: list[bytes] = []
                    for e in entries:
                        sid = shared_id.get(e)
                        if sid is None or len(ids) >= fmt.XATTR_SHARED_MAX:
                            inline.append(e)
                        else:
                            ids.append(sid)
                    xbody = (xheader_pack(0, len(ids)) + b"".join(map(u32_pack, ids))
                             + b"".join(inline))
                else:
                    xbody = no_shared + b"".join(entries)
                xsize = len(xbody)
                icount = ((xsize - 12) >> 2) + 1
            else:
                xbody = b""
                xsize = icount = 0
            mode, uid, gid, nlink, mtime = rec[0], rec[1], rec[2], rec[3], rec[5]
            compact = (mtime == epoch_ns and uid <= 0xFFFF and gid <= 0xFFFF
                       and nlink <= 0xFFFF and sz <= 0xFFFFFFFF)
            head = xsize + (32 if compact else 64)
            pos = len(meta)
            pad = -pos & SLOT_MASK
            i_format = 0
            i_u = 0
            tail = b""  # bytes after the inode and its xattrs
            if k == reg_k:
                if sz:
                    # One chunk covering the whole file where it can (chunks up to 8 TiB),
                    # every chunk a hole: the content comes from overlayfs's data layers.
                    bits = (sz - 1).bit_length()
                    if bits < fmt.BLOCK_BITS:
                        bits = fmt.BLOCK_BITS
                    elif bits > fmt.MAX_CHUNK_BITS:
                        bits = fmt.MAX_CHUNK_BITS
                    i_format = chunk_layout
                    i_u = bits - fmt.BLOCK_BITS
                    tail = one_chunk_map if sz <= 1 << bits else (
                        b"\xff" * (4 * (((sz - 1) >> bits) + 1)))
            elif k in (dir_k, lnk_k):
                if k == dir_k:
                    _names, _children, starts, tlen = dirs[ino]
                    full = len(starts) - 1
                else:
                    tlen, full = sz, 0
                if tlen <= inline_max:
                    # Inline data must not cross a block boundary: when it would, pad
                    # the inode so the tail starts (slot-aligned) in the next block.
                    i_format = inline_layout
                    room = block - ((pos + pad + head) & BLOCK_MASK)
                    if tlen > room:
                        pad += (room + SLOT_MASK) & ~SLOT_MASK
                    if k == dir_k:
                        self.tail_pos[ino] = pos + pad + head
                        tail = zeros[:tlen]  # entries written once every nid is known
                    else:
                        tail = target[ino]
                else:
                    full += 1
                    if k == lnk_k:
                        long_links.append((n_data, target[ino]))
                if full:
                    patches.append((pos + pad, n_data))
                    if k == dir_k:
                        self.first_block[ino] = n_data
                    n_data += full
            elif k in (chr_k, blk_k):
                i_u = rdev[ino]
            if pad:
                meta += zeros[:pad]
            nid[ino] = (pos + pad) >> fmt.SLOT_BITS
            if compact:
                meta += compact_pack(i_format | fmt.LAYOUT_COMPACT, icount, mode, nlink, sz,
                                     0, i_u, ino, uid, gid, 0)
                n_compact += 1
            else:
                sec, nsec = divmod(mtime, 1_000_000_000)
                meta += extended_pack(i_format | fmt.LAYOUT_EXTENDED, icount, mode, 0, sz,
                                      i_u, ino, uid, gid, sec, nsec, nlink)
            if xsize:
                meta += xbody
            if tail:
                meta += tail
        if nid[ROOT_INO] > 0xFFFF:  # the superblock's root nid is 16 bits; the root is first
            raise ErofsUnsupported("root inode beyond nid 65535")
        meta += zeros[:-len(meta) & BLOCK_MASK]
        self.xattr_blkaddr = len(meta) >> fmt.BLOCK_BITS
        for e in shared:
            meta += e
        meta += zeros[:-len(meta) & BLOCK_MASK]
        self.data_blk = data_blk = len(meta) >> fmt.BLOCK_BITS
        if data_blk + n_data > 0xFFFFFFFF:
            raise ErofsUnsupported("image larger than 16 TiB")
        for at, rel in patches:
            _U32.pack_into(meta, at + fmt.I_U_OFFSET, data_blk + rel)
        data = bytearray(n_data << fmt.BLOCK_BITS)
        for rel, link in long_links:
            data[rel << fmt.BLOCK_BITS:(rel << fmt.BLOCK_BITS) + len(link)] = link
        self.counts.update(compact=n_compact, shared=len(shared))
        return meta, data

    def _write_directories(self, meta: bytearray, data: bytearray) -> None:
        """Every directory's entries: whole blocks in the data area, the last block
        inline after the inode or in the data area too."""
        nid, kind, parent = self.nid, self.kind, self.parent
        ftype_of = fmt.FILE_TYPE
        pack = fmt.DIRENT.pack_into
        tail_pos, first_block = self.tail_pos, self.first_block
        for ino, (names, children, starts, _used) in self.dirs.items():
            up = parent[ino]
            last = len(starts) - 1
            for b, lo in enumerate(starts):
                hi = starts[b + 1] if b < last else len(names)
                if b == last and ino in tail_pos:
                    buf, at = meta, tail_pos[ino]
                else:
                    buf, at = data, (first_block[ino] + b) << fmt.BLOCK_BITS
                nameoff = 12 * (hi - lo)
                for j in range(lo, hi):
                    child = children[j] or up
                    pack(buf, at, nid[child], nameoff, ftype_of[kind[child]], 0)
                    at += 12
                    nameoff += len(names[j])
                blob = b"".join(names[lo:hi])
                buf[at:at + len(blob)] = blob

    def _write_superblock(self, meta: bytearray, blocks: int) -> None:
        m = self.m
        # A stable volume UUID from what the image is made of (no clock, no randomness).
        source = m.digest.encode() if m.digest else blake3.blake3(bytes(m.buf)).digest()
        uuid = bytearray(blake3.blake3(
            b"casfs-erofs\0%d\0%d\0" % (EROFS_LAYOUT_VERSION, self.drop_security) + source
        ).digest()[:16])
        uuid[6] = (uuid[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom)
        uuid[8] = (uuid[8] & 0x3F) | 0x80
        epoch_s, epoch_ns = divmod(self.epoch_ns, 1_000_000_000)
        fmt.SUPERBLOCK.pack_into(
            meta, fmt.SUPER_OFFSET,
            fmt.SUPER_MAGIC, 0, 0, fmt.BLOCK_BITS, 0, self.nid[ROOT_INO], self.n,
            epoch_s, epoch_ns, blocks, 0, self.xattr_blkaddr, bytes(uuid), b"casfs",
            fmt.FEATURE_INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0)
