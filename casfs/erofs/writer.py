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

The build runs in three passes over the manifest's tables, read in bulk (no
Python object per entry beyond a few tuples): plan (what each inode holds and how
big it is), place (inode numbers, padding, data blocks), render (one bytearray the
size of the image, written out at once). The output depends only on the manifest
and the options: the same manifest always gives the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import blake3

from casfs.erofs import format as fmt
from casfs.erofs.checks import (
    MAX_OBJECT_PATH,
    MAX_SYMLINK,
    OVERLAY_XATTR_ALLOWANCE,
    ErofsUnsupported,
    device_reason,
    encode_rdev,
    xattr_budget,
    xattr_key,
    xattr_reason,
)
from casfs.errors import ManifestError
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
_REDIRECT_HEAD = fmt.XATTR_ENTRY.pack(16, fmt.XATTR_INDEX_TRUSTED, 0)[:2]  # + u16 value size
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
    image, info = render_erofs(manifest, object_path=object_path,
                               drop_security_xattrs=drop_security_xattrs)
    if hasattr(out, "write"):
        out.write(image)  # type: ignore[union-attr]
    else:
        _write_atomically(os.fspath(out), image)  # type: ignore[arg-type]
    return info


def render_erofs(
    manifest: Manifest, *, object_path: ObjectPath, drop_security_xattrs: bool = False
) -> tuple[bytearray, ErofsInfo]:
    """The image bytes and their summary (build_erofs without the writing)."""
    plan = _Plan(manifest, object_path, drop_security_xattrs)
    plan.place()
    return plan.render()


def _write_atomically(path: str, data: bytearray) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".erofs-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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


class _Plan:
    """One build: the manifest's tables, what each inode becomes, and where it goes.

    Per-inode state lives in parallel lists indexed by manifest inode number
    (index 0 unused), which keeps the passes free of per-inode objects.
    """

    def __init__(self, m: Manifest, object_path: ObjectPath, drop_security: bool) -> None:
        self.m = m
        self.drop_security = drop_security
        n = self.n = m.n_inodes
        _meta, o_ino, o_dir, o_chunk, o_xattr, o_str = section_offsets(
            m.meta_len, n, m.n_dirents, m.n_chunks, m.n_xattrs)
        buf = m.buf
        self.inodes = [(0,) * 14, *INODE.iter_unpack(buf[o_ino:o_dir])]
        self.dirents = list(DIRENT.iter_unpack(buf[o_dir:o_chunk]))
        self.mxattrs = list(XATTR.iter_unpack(buf[o_xattr:o_str]))
        self.strings = bytes(buf[o_str:o_str + m.strings_len])
        self.kind = [0] * (n + 1)
        self.parent = [0] * (n + 1)
        self.parent[ROOT_INO] = ROOT_INO
        # Directory contents: ino -> (names, children, block start indexes, last block's bytes)
        self.dirs: dict[int, tuple[list[bytes], list[int], list[int], int]] = {}
        self.size = [0] * (n + 1)  # i_size as written
        self.xattr_entries: list[list[bytes] | None] = [None] * (n + 1)
        self.counts = Counter(
            {k: 0 for k in ("dir", "reg", "empty", "lnk", "dev", "fifo", "sock", "dirents",
                            "hardlinked", "xattrs")})
        self._plan_entries()
        self._plan_inodes(object_path)

    # -- pass 1: what each inode holds ----------------------------------------------------

    def _plan_entries(self) -> None:
        """Read every directory: names checked and sorted, "." and ".." added, parents
        found, entries cut into blocks (each block: all its dirents, then all its names)."""
        n, inodes, dirents, strings = self.n, self.inodes, self.dirents, self.strings
        n_dirents, n_strings = len(dirents), len(strings)
        is_dir = bytearray(n + 1)
        for ino in range(1, n + 1):
            if inodes[ino][0] & 0o170000 == stat.S_IFDIR:
                is_dir[ino] = 1
        if not is_dir[ROOT_INO]:
            raise ManifestError("manifest root is not a directory")
        parent = self.parent
        has_parent = bytearray(n + 1)
        total = 0
        for ino in range(1, n + 1):
            if not is_dir[ino]:
                continue
            first, count = inodes[ino][7], inodes[ino][8]
            if first + count > n_dirents:
                raise ManifestError(f"inode {ino}: directory entries out of range")
            names: list[bytes] = []
            children: list[int] = []
            prev = b""
            for name_off, name_len, _r, child in dirents[first:first + count]:
                end = name_off + name_len
                if end > n_strings or not 1 <= child <= n:
                    raise ManifestError(f"inode {ino}: entry out of range")
                name = strings[name_off:end]
                if (not name or name_len > fmt.NAME_LEN or name <= prev or b"/" in name
                        or b"\0" in name or name == b"." or name == b".."):
                    raise ManifestError(
                        f"inode {ino}: invalid, duplicate or unsorted entry name {name!r}")
                prev = name
                if is_dir[child]:
                    if child == ROOT_INO or has_parent[child]:
                        raise ManifestError(f"directory inode {child} has two parents")
                    has_parent[child] = 1
                    parent[child] = ino
                names.append(name)
                children.append(child)
            total += count
            # "." and ".." are entries like any other in EROFS, in name order.
            # Child 0 stands for the parent, known once every directory is read.
            for special, target in ((b".", ino), (b"..", 0)):
                at = bisect_left(names, special)
                names.insert(at, special)
                children.insert(at, target)
            starts = [0]
            used = 0
            for i, name in enumerate(names):
                size = 12 + len(name)
                if used + size > fmt.BLOCK_SIZE:
                    starts.append(i)
                    used = 0
                used += size
            self.dirs[ino] = (names, children, starts, used)
            self.size[ino] = (len(starts) - 1) * fmt.BLOCK_SIZE + used
        self.counts["dirents"] = total
        for ino in range(2, n + 1):
            if is_dir[ino] and not has_parent[ino]:
                parent[ino] = ROOT_INO  # unreachable: its ".." must still name a directory

    def _plan_inodes(self, object_path: ObjectPath) -> None:
        """Kinds, sizes, symlink targets, device numbers and xattr entries of every inode."""
        n, inodes, strings = self.n, self.inodes, self.strings
        counts = self.counts
        kind, size = self.kind, self.size
        self.target: dict[int, bytes] = {}
        self.rdev = [0] * (n + 1)
        entries_of = self.xattr_entries
        names_seen = Counter(child for _n, _o, _r, child in self.dirents)
        xcache: dict[bytes, bytes | None] = {}
        mx, n_mx = self.mxattrs, len(self.mxattrs)
        n_strings = len(strings)
        for ino in range(1, n + 1):
            rec = inodes[ino]
            mode = rec[0]
            k = mode & 0o170000
            if mode > 0xFFFF or k not in fmt.FILE_TYPE:
                raise ManifestError(f"inode {ino}: unknown file type or mode {mode:o}")
            kind[ino] = k
            entries: list[bytes] = []
            if k == stat.S_IFREG:
                size[ino] = rec[4]
                if rec[4]:
                    counts["reg"] += 1
                    entries.append(_METACOPY_ENTRY)
                    entries.append(self._redirect(ino, object_path(ino)))
                else:
                    counts["empty"] += 1
            elif k == stat.S_IFDIR:
                counts["dir"] += 1
            elif k == stat.S_IFLNK:
                str_off, length = rec[13], rec[8]
                if str_off + length > n_strings:
                    raise ManifestError(f"inode {ino}: symlink target out of range")
                if not 0 < length <= MAX_SYMLINK:
                    raise ErofsUnsupported(
                        f"inode {ino}: symlink target of {length} bytes (Linux allows 1 to "
                        f"{MAX_SYMLINK})")
                self.target[ino] = strings[str_off:str_off + length]
                size[ino] = length
                counts["lnk"] += 1
            elif k in (stat.S_IFCHR, stat.S_IFBLK):
                reason = device_reason(rec[6])
                if reason:
                    raise ErofsUnsupported(f"inode {ino}: {reason}")
                self.rdev[ino] = encode_rdev(rec[6])
                counts["dev"] += 1
            elif k == stat.S_IFIFO:
                counts["fifo"] += 1
            else:
                counts["sock"] += 1
            if k != stat.S_IFDIR and names_seen.get(ino, 0) > 1:
                counts["hardlinked"] += 1
            xf, xc = rec[9], rec[10]
            if xc:
                if xf + xc > n_mx:
                    raise ManifestError(f"inode {ino}: xattr reference out of range")
                # The same bound kernel_mode_obstacle applies (checks.xattr_budget).
                budget = 12 + (OVERLAY_XATTR_ALLOWANCE if entries else 0)
                for name_off, name_len, _r, value_off, value_len in mx[xf:xf + xc]:
                    if name_off + name_len > n_strings or value_off + value_len > n_strings:
                        raise ManifestError(f"inode {ino}: xattr out of range")
                    name = strings[name_off:name_off + name_len]
                    if self.drop_security and name.startswith(b"security."):
                        continue
                    value = strings[value_off:value_off + value_len]
                    head = xcache.get(name, b"")
                    if head == b"":
                        head = xcache[name] = self._xattr_head(name)
                    if head is None or value_len > fmt.XATTR_VALUE_MAX or name in fmt.XATTR_EXACT:
                        reason = xattr_reason(name, value)
                        if reason:
                            raise ErofsUnsupported(f"inode {ino}: {reason}")
                    assert head is not None
                    budget += xattr_budget(name_len, value_len)
                    entry = head[:2] + value_len.to_bytes(2, "little") + head[4:] + value
                    entries.append(entry + _PAD[len(entry) & 3])
                if budget > fmt.XATTR_IBODY_MAX:
                    raise ErofsUnsupported(
                        f"inode {ino}: {budget} bytes of xattrs (EROFS holds at most "
                        f"{fmt.XATTR_IBODY_MAX} per inode)")
            if entries:
                entries_of[ino] = entries
                counts["xattrs"] += len(entries)

    @staticmethod
    def _xattr_head(name: bytes) -> bytes | None:
        """An xattr entry's header and name suffix (value size left 0), or None when
        EROFS cannot store the name."""
        key = xattr_key(_escape_xattr_name(name))
        if key is None:
            return None
        index, suffix = key
        return fmt.XATTR_ENTRY.pack(len(suffix), index, 0) + suffix

    @staticmethod
    def _redirect(ino: int, path: bytes) -> bytes:
        if (not isinstance(path, bytes) or not path.startswith(b"/") or b"\0" in path
                or len(path) > MAX_OBJECT_PATH):
            raise ErofsUnsupported(
                f"inode {ino}: object path {path!r} is not an absolute path (bytes, no NUL, "
                f"at most {MAX_OBJECT_PATH} bytes)")
        entry = _REDIRECT_HEAD + len(path).to_bytes(2, "little") + b"overlay.redirect" + path
        return entry + _PAD[len(entry) & 3]

    # -- pass 2: where everything goes ------------------------------------------------------

    def place(self) -> None:
        """Share xattrs used by several inodes, choose compact or extended inodes,
        assign each inode its position (nid) and data blocks."""
        n, inodes, kind, size = self.n, self.inodes, self.kind, self.size
        # Shared xattrs: any entry (name and value) that two or more inodes carry,
        # such as trusted.overlay.metacopy, is stored once and referenced by a 4-byte id.
        uses = Counter(e for entries in self.xattr_entries if entries for e in entries)
        shared = sorted(e for e, c in uses.items() if c > 1)
        self.shared = shared
        self.shared_off: dict[bytes, int] = {}
        off = 0
        for e in shared:
            self.shared_off[e] = off
            off += len(e)
        self.shared_size = off
        # Compact (32-byte) inodes carry no mtime of their own: they all have the
        # superblock's epoch. The image's most common mtime becomes the epoch.
        mtimes = Counter(rec[5] for rec in inodes[1:] if rec[5] >= 0)
        self.epoch_ns = 0
        epoch_ns: int | None = None  # None: every inode extended
        if mtimes:
            best = max(mtimes.values())
            epoch_ns = self.epoch_ns = min(t for t, c in mtimes.items() if c == best)

        self.nid = [0] * (n + 1)
        self.compact = bytearray(n + 1)
        self.xsize = [0] * (n + 1)
        self.xshared: list[list[bytes] | None] = [None] * (n + 1)
        self.inline_tail = bytearray(n + 1)  # 1: the tail follows the inode
        self.startblk = [0] * (n + 1)  # first data block, relative to the data area
        self.datablocks = [0] * (n + 1)
        self.chunkbits = [0] * (n + 1)
        n_data = 0
        pos = META_START
        for ino in range(1, n + 1):
            rec = inodes[ino]
            k = kind[ino]
            compact = (rec[5] == epoch_ns and rec[1] <= 0xFFFF and rec[2] <= 0xFFFF
                       and rec[3] <= 0xFFFF and size[ino] <= 0xFFFFFFFF)
            self.compact[ino] = compact
            isize = 32 if compact else 64
            entries = self.xattr_entries[ino]
            xsize = 0
            if entries:
                mine = [e for e in entries if e in self.shared_off][: fmt.XATTR_SHARED_MAX]
                inline = [e for e in entries if e not in mine] if mine else entries
                self.xshared[ino] = mine
                self.xattr_entries[ino] = inline
                xsize = 12 + 4 * len(mine) + sum(len(e) for e in inline)
            self.xsize[ino] = xsize
            pos = (pos + SLOT_MASK) & ~SLOT_MASK
            extra = 0  # bytes after inode and xattrs: inline tail or chunk map
            if k == stat.S_IFDIR or k == stat.S_IFLNK:
                if k == stat.S_IFDIR:
                    _names, _children, starts, tail = self.dirs[ino]
                    full = len(starts) - 1
                else:
                    tail, full = size[ino], 0
                if 0 < tail <= INLINE_MAX:
                    self.inline_tail[ino] = 1
                    extra = tail
                    start = pos + isize + xsize
                    room = fmt.BLOCK_SIZE - (start & BLOCK_MASK)
                    if tail > room:
                        # Pad so the tail starts (slot-aligned) in the next block.
                        pos += (room + SLOT_MASK) & ~SLOT_MASK
                else:
                    full += 1
                if full:
                    self.startblk[ino] = n_data
                    self.datablocks[ino] = full
                    n_data += full
            elif k == stat.S_IFREG and size[ino]:
                # One chunk covering the whole file when it can (chunks up to 8 TiB).
                bits = min(max(fmt.BLOCK_BITS, (size[ino] - 1).bit_length()), fmt.MAX_CHUNK_BITS)
                self.chunkbits[ino] = bits
                extra = 4 * (((size[ino] - 1) >> bits) + 1)
            self.nid[ino] = pos >> fmt.SLOT_BITS
            pos += isize + xsize + extra
        self.meta_end = pos
        self.n_data = n_data
        if self.nid[ROOT_INO] > 0xFFFF:
            raise ErofsUnsupported("root inode placed beyond nid 65535")  # cannot happen: it is first

    # -- pass 3: the bytes --------------------------------------------------------------------

    def render(self) -> tuple[bytearray, ErofsInfo]:
        n, inodes, kind, size, nid = self.n, self.inodes, self.kind, self.size, self.nid
        shared_start = (self.meta_end + SLOT_MASK) & ~SLOT_MASK
        xattr_blkaddr = shared_start >> fmt.BLOCK_BITS
        base = shared_start - (xattr_blkaddr << fmt.BLOCK_BITS)
        if (base + self.shared_size) >> 2 > 0xFFFFFFFF:
            raise ErofsUnsupported("shared xattr area larger than 16 GiB")
        shared_id = {e: (base + off) >> 2 for e, off in self.shared_off.items()}
        data_blk = (shared_start + self.shared_size + BLOCK_MASK) >> fmt.BLOCK_BITS
        blocks = data_blk + self.n_data
        if blocks > 0xFFFFFFFF:
            raise ErofsUnsupported("image larger than 16 TiB")
        img = bytearray(blocks << fmt.BLOCK_BITS)
        p = shared_start
        for e in self.shared:
            img[p:p + len(e)] = e
            p += len(e)

        ftype = [0] * (n + 1)
        for ino in range(1, n + 1):
            ftype[ino] = fmt.FILE_TYPE[kind[ino]]
        epoch_s, epoch_ns = divmod(self.epoch_ns, 1_000_000_000)
        compact_pack = fmt.INODE_COMPACT.pack_into
        extended_pack = fmt.INODE_EXTENDED.pack_into
        xheader_pack = fmt.XATTR_IBODY_HEADER.pack_into
        for ino in range(1, n + 1):
            rec = inodes[ino]
            k = kind[ino]
            pos = nid[ino] << fmt.SLOT_BITS
            i_u = 0
            layout = fmt.DATALAYOUT_FLAT_PLAIN
            if k == stat.S_IFREG:
                if size[ino]:
                    layout = fmt.DATALAYOUT_CHUNK_BASED
                    i_u = self.chunkbits[ino] - fmt.BLOCK_BITS
            elif k == stat.S_IFDIR or k == stat.S_IFLNK:
                if self.inline_tail[ino]:
                    layout = fmt.DATALAYOUT_FLAT_INLINE
                if self.datablocks[ino]:
                    i_u = data_blk + self.startblk[ino]
            elif k == stat.S_IFCHR or k == stat.S_IFBLK:
                i_u = self.rdev[ino]
            xsize = self.xsize[ino]
            icount = (xsize - 12) // 4 + 1 if xsize else 0
            mode, uid, gid, nlink = rec[0], rec[1], rec[2], rec[3]
            if self.compact[ino]:
                compact_pack(img, pos, (layout << fmt.DATALAYOUT_BIT) | fmt.LAYOUT_COMPACT,
                             icount, mode, nlink, size[ino], 0, i_u, ino, uid, gid, 0)
                p = pos + 32
            else:
                sec, nsec = divmod(rec[5], 1_000_000_000)
                extended_pack(img, pos, (layout << fmt.DATALAYOUT_BIT) | fmt.LAYOUT_EXTENDED,
                              icount, mode, 0, size[ino], i_u, ino, uid, gid, sec, nsec, nlink)
                p = pos + 64
            if xsize:
                mine = self.xshared[ino] or []
                xheader_pack(img, p, 0, len(mine))
                p += 12
                for e in mine:
                    img[p:p + 4] = shared_id[e].to_bytes(4, "little")
                    p += 4
                for e in self.xattr_entries[ino] or ():
                    img[p:p + len(e)] = e
                    p += len(e)
            if k == stat.S_IFDIR:
                self._render_dir(img, ino, p, data_blk, nid, ftype)
            elif k == stat.S_IFLNK:
                target = self.target[ino]
                at = p if self.inline_tail[ino] else (data_blk + self.startblk[ino]) << fmt.BLOCK_BITS
                img[at:at + len(target)] = target
            elif layout == fmt.DATALAYOUT_CHUNK_BASED:
                length = 4 * (((size[ino] - 1) >> self.chunkbits[ino]) + 1)
                img[p:p + length] = b"\xff" * length  # every chunk a hole: EROFS_NULL_ADDR

        self._render_superblock(img, blocks, xattr_blkaddr, epoch_s, epoch_ns)
        c = self.counts
        info = ErofsInfo(
            layout_version=EROFS_LAYOUT_VERSION, image_size=len(img), blocks=blocks,
            inodes=n, directories=c["dir"], regular_files=c["reg"], empty_files=c["empty"],
            symlinks=c["lnk"], devices=c["dev"], fifos=c["fifo"], sockets=c["sock"],
            dirents=c["dirents"], hardlinked_inodes=c["hardlinked"],
            compact_inodes=sum(self.compact), xattrs=c["xattrs"],
            shared_xattrs=len(self.shared))
        return img, info

    def _render_dir(self, img: bytearray, ino: int, tail_at: int, data_blk: int,
                    nid: list[int], ftype: list[int]) -> None:
        names, children, starts, _tail = self.dirs[ino]
        parent = self.parent[ino]
        pack = fmt.DIRENT.pack_into
        first_blk = data_blk + self.startblk[ino]
        ends = [*starts[1:], len(names)]
        last = len(starts) - 1
        for b, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            at = tail_at if b == last and self.inline_tail[ino] else (first_blk + b) << fmt.BLOCK_BITS
            nameoff = 12 * (hi - lo)
            p = at
            for j in range(lo, hi):
                child = children[j] or parent
                pack(img, p, nid[child], nameoff, ftype[child], 0)
                p += 12
                nameoff += len(names[j])
            blob = b"".join(names[lo:hi])
            img[p:p + len(blob)] = blob

    def _render_superblock(self, img: bytearray, blocks: int, xattr_blkaddr: int,
                           epoch_s: int, epoch_ns: int) -> None:
        m = self.m
        # A stable volume UUID from what the image is made of (no clock, no randomness).
        source = m.digest.encode() if m.digest else blake3.blake3(bytes(m.buf)).digest()
        uuid = bytearray(blake3.blake3(
            b"casfs-erofs\0%d\0%d\0" % (EROFS_LAYOUT_VERSION, self.drop_security) + source
        ).digest()[:16])
        uuid[6] = (uuid[6] & 0x0F) | 0x80  # RFC 9562 version 8 (custom)
        uuid[8] = (uuid[8] & 0x3F) | 0x80
        fmt.SUPERBLOCK.pack_into(
            img, fmt.SUPER_OFFSET,
            fmt.SUPER_MAGIC, 0, 0, fmt.BLOCK_BITS, 0, self.nid[ROOT_INO], self.n,
            epoch_s, epoch_ns, blocks, 0, xattr_blkaddr, bytes(uuid), b"casfs",
            fmt.FEATURE_INCOMPAT_CHUNKED_FILE, 0, 0, 0, 0, 0, 0, 0)
