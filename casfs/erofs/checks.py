"""What an EROFS image served through overlayfs can and cannot represent.

One place for the rules, so that kernel_mode_obstacle (asked before a build, to
choose between kernel and FUSE serving) and the writer (which refuses the same
things with ErofsUnsupported) never disagree. The xattr space of an inode is
judged by xattr_budget, an upper bound of what the writer lays out before it
shares any xattr, so both sides apply the same bound.
"""

from __future__ import annotations

import os
import stat

from casfs.erofs import format as fmt
from casfs.errors import ManifestError
from casfs.manifest.layout import INODE, XATTR, section_offsets
from casfs.manifest.reader import Manifest

MAX_SYMLINK = 4095  # PATH_MAX less the NUL: the longest target symlink(2) accepts
MAX_OBJECT_PATH = 400  # longest redirect (object path) the writer accepts
# Room kept for the two overlay xattrs a regular file gets (metacopy + redirect) when
# judging whether a file's own xattrs fit, before object paths are known.
OVERLAY_XATTR_ALLOWANCE = 20 + ((4 + 16 + MAX_OBJECT_PATH + 3) & ~3)
_POSIX_ACL_XATTR_VERSION = 2


def xattr_key(name: bytes) -> tuple[int, bytes] | None:
    """EROFS's (name index, stored suffix) for a full xattr name, or None when EROFS
    has no way to store it (an unknown namespace, an empty or over-long suffix)."""
    exact = fmt.XATTR_EXACT.get(name)
    if exact is not None:
        return exact, b""
    for prefix, index in fmt.XATTR_PREFIXES:
        if name.startswith(prefix):
            suffix = name[len(prefix):]
            if not suffix or len(suffix) > fmt.NAME_LEN or b"\0" in suffix:
                return None
            return index, suffix
    return None


def xattr_reason(name: bytes, value: bytes | int) -> str | None:
    """Why the xattr (name, value or value length) cannot be in the image, or None.
    The name is the image's own; trusted.overlay.* is judged escaped, as written."""
    escaped = name
    if name.startswith(b"trusted.overlay."):
        escaped = b"trusted.overlay.overlay." + name[len(b"trusted.overlay."):]
    if xattr_key(escaped) is None:
        return f"xattr {name[:80]!r} has a name EROFS cannot store"
    length = value if isinstance(value, int) else len(value)
    if length > fmt.XATTR_VALUE_MAX:
        return f"xattr {name[:80]!r} has a {length}-byte value (EROFS stores at most {fmt.XATTR_VALUE_MAX})"
    if name in fmt.XATTR_EXACT and isinstance(value, bytes) and (
            length < 4 or (length - 4) % 8
            or int.from_bytes(value[:4], "little") != _POSIX_ACL_XATTR_VERSION):
        return f"xattr {name.decode()} is not a POSIX ACL the kernel can parse"
    return None


def device_reason(rdev: int) -> str | None:
    """Why a device number cannot be in the image (EROFS keeps the kernel's 32-bit
    encoding: 12-bit major, 20-bit minor), or None."""
    if rdev < 0 or os.major(rdev) > 0xFFF or os.minor(rdev) > 0xFFFFF:
        return f"device number {rdev:#x} does not fit the kernel's 12-bit major / 20-bit minor"
    return None


def encode_rdev(rdev: int) -> int:
    """The kernel's new_encode_dev() of a (glibc makedev) device number."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def xattr_budget(name_len: int, value_len: int) -> int:
    """Upper bound of one xattr's bytes in an inode's xattr area (full name counted:
    the stored suffix is never longer, escaping included)."""
    return (4 + name_len + value_len + 3) & ~3


def kernel_mode_obstacle(manifest: Manifest, *, drop_security_xattrs: bool = False) -> str | None:
    """A one-line reason why this image cannot be served correctly as an EROFS image
    under overlayfs (the caller then serves it with FUSE), or None when it can.

    Reasons: a 0/0 character device (overlayfs would take it for a whiteout and hide
    it), a device number the kernel cannot encode, a symlink target that is empty or
    longer than PATH_MAX, an xattr EROFS cannot store (unknown namespace, value over
    64 KiB - 1, an unparseable POSIX ACL, more xattrs than one inode holds). Costs
    one pass over the inode and xattr tables. Raises ManifestError for a manifest
    whose tables are out of bounds.
    """
    m = manifest
    _meta, o_ino, o_dir, _o_chunk, o_xattr, o_str = section_offsets(
        m.meta_len, m.n_inodes, m.n_dirents, m.n_chunks, m.n_xattrs)
    buf = m.buf
    strings = bytes(buf[o_str:o_str + m.strings_len])
    xattrs = list(XATTR.iter_unpack(buf[o_xattr:o_str]))
    for ino, rec in enumerate(INODE.iter_unpack(buf[o_ino:o_dir]), start=1):
        mode, size, rdev, count, xf, xc = rec[0], rec[4], rec[6], rec[8], rec[9], rec[10]
        kind = stat.S_IFMT(mode)
        where = f"inode {ino}"
        if kind == stat.S_IFCHR and rdev == 0:
            return f"{where} is a 0/0 character device, which overlayfs takes for a whiteout"
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            reason = device_reason(rdev)
            if reason:
                return f"{where}: {reason}"
        if kind == stat.S_IFLNK and not 0 < count <= MAX_SYMLINK:
            return f"{where}: symlink target of {count} bytes (Linux allows 1 to {MAX_SYMLINK})"
        if not xc:
            continue
        if xf + xc > len(xattrs):
            raise ManifestError(f"{where}: xattr reference out of range")
        total = 12 + (OVERLAY_XATTR_ALLOWANCE if kind == stat.S_IFREG and size else 0)
        for name_off, name_len, _r, value_off, value_len in xattrs[xf:xf + xc]:
            if name_off + name_len > len(strings) or value_off + value_len > len(strings):
                raise ManifestError(f"{where}: xattr out of range")
            name = strings[name_off:name_off + name_len]
            if drop_security_xattrs and name.startswith(b"security."):
                continue
            reason = xattr_reason(name, strings[value_off:value_off + value_len])
            if reason:
                return f"{where}: {reason}"
            total += xattr_budget(name_len, value_len)
        if total > fmt.XATTR_IBODY_MAX:
            return f"{where}: {total} bytes of xattrs (EROFS holds at most {fmt.XATTR_IBODY_MAX} per inode)"
    return None
