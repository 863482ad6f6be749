"""The EROFS on-disk format as casfs writes it: constants and struct layouts.

Taken from the kernel's fs/erofs/erofs_fs.h (checked against Linux 6.18 and
erofs-utils 1.5, whose fsck.erofs is the test oracle). Only what casfs's
writer uses is here: uncompressed images, 4 KiB blocks, no device table, no
long xattr prefixes, no compression. All integers are little-endian.
"""

from __future__ import annotations

import stat
import struct

SUPER_MAGIC = 0xE0F5E1E2
SUPER_OFFSET = 1024  # the superblock lives at byte 1024 of block 0
BLOCK_BITS = 12
BLOCK_SIZE = 1 << BLOCK_BITS
SLOT_BITS = 5  # an inode number (nid) counts 32-byte slots from the metadata start
SLOT_SIZE = 1 << SLOT_BITS

FEATURE_INCOMPAT_CHUNKED_FILE = 0x00000004

# i_format: bit 0 = inode version (0 compact, 1 extended), bits 1-3 = data layout.
LAYOUT_COMPACT = 0
LAYOUT_EXTENDED = 1
DATALAYOUT_FLAT_PLAIN = 0  # data in whole blocks starting at i_u (startblk)
DATALAYOUT_FLAT_INLINE = 2  # whole blocks at startblk, the last partial block right after the inode
DATALAYOUT_CHUNK_BASED = 4  # a chunk map after the inode (casfs: every entry a hole)
DATALAYOUT_BIT = 1

# i_u of a chunk-based inode holds the chunk format: chunk size = block size << (format & 0x1f).
CHUNK_FORMAT_BLKBITS_MASK = 0x001F
NULL_ADDR32 = 0xFFFFFFFF  # a 4-byte block-map entry meaning "hole" (EROFS_NULL_ADDR)
MAX_CHUNK_BITS = BLOCK_BITS + CHUNK_FORMAT_BLKBITS_MASK  # 8 TiB chunks

NAME_LEN = 255

# Dirent file types.
FT_REG_FILE = 1
FT_DIR = 2
FT_CHRDEV = 3
FT_BLKDEV = 4
FT_FIFO = 5
FT_SOCK = 6
FT_SYMLINK = 7
FILE_TYPE = {
    stat.S_IFREG: FT_REG_FILE,
    stat.S_IFDIR: FT_DIR,
    stat.S_IFCHR: FT_CHRDEV,
    stat.S_IFBLK: FT_BLKDEV,
    stat.S_IFIFO: FT_FIFO,
    stat.S_IFSOCK: FT_SOCK,
    stat.S_IFLNK: FT_SYMLINK,
}

# Xattr name indexes: the name stored on disk is what follows the prefix.
XATTR_INDEX_USER = 1
XATTR_INDEX_POSIX_ACL_ACCESS = 2
XATTR_INDEX_POSIX_ACL_DEFAULT = 3
XATTR_INDEX_TRUSTED = 4
XATTR_INDEX_SECURITY = 6
# The two POSIX ACL names are whole names (empty suffix); the others are prefixes.
XATTR_EXACT = {
    b"system.posix_acl_access": XATTR_INDEX_POSIX_ACL_ACCESS,
    b"system.posix_acl_default": XATTR_INDEX_POSIX_ACL_DEFAULT,
}
XATTR_PREFIXES = (
    (b"user.", XATTR_INDEX_USER),
    (b"trusted.", XATTR_INDEX_TRUSTED),
    (b"security.", XATTR_INDEX_SECURITY),
)
XATTR_VALUE_MAX = 0xFFFF  # e_value_size is 16 bits
XATTR_ICOUNT_MAX = 0xFFFF  # i_xattr_icount is 16 bits
XATTR_IBODY_MAX = 12 + 4 * (XATTR_ICOUNT_MAX - 1)  # largest xattr area one inode can have
XATTR_SHARED_MAX = 255  # h_shared_count is 8 bits

# magic, checksum, feature_compat, blkszbits, sb_extslots, root_nid, inos, epoch,
# fixed_nsec, blocks, meta_blkaddr, xattr_blkaddr, uuid, volume_name, feature_incompat,
# available_compr_algs, extra_devices, devt_slotoff, dirblkbits, xattr_prefix_count,
# xattr_prefix_start, packed_nid, then reserved bytes up to 128 (sb_extslots = 0).
SUPERBLOCK = struct.Struct("<IIIBBHQQIIII16s16sIHHHBBIQ24x")
assert SUPERBLOCK.size == 128

# i_format, i_xattr_icount, i_mode, i_nlink, i_size, i_mtime (0: the epoch), i_u, i_ino,
# i_uid, i_gid, reserved
INODE_COMPACT = struct.Struct("<HHHHIIIIHHI")
assert INODE_COMPACT.size == 32
# i_format, i_xattr_icount, i_mode, i_nb (0), i_size, i_u, i_ino, i_uid, i_gid,
# i_mtime (seconds, signed), i_mtime_nsec, i_nlink, reserved
INODE_EXTENDED = struct.Struct("<HHHHQIIIIqII16x")
assert INODE_EXTENDED.size == 64
I_U_OFFSET = 16  # i_u (start block, rdev or chunk format) sits at byte 16 of both forms
assert struct.calcsize("<HHHHII") == struct.calcsize("<HHHHQ") == I_U_OFFSET

# h_name_filter (0: no filter, the superblock does not enable it), h_shared_count, reserved
XATTR_IBODY_HEADER = struct.Struct("<IB7x")
# e_name_len, e_name_index, e_value_size; then the name suffix and the value, padded to 4
XATTR_ENTRY = struct.Struct("<BBH")
# nid, nameoff, file_type, reserved
DIRENT = struct.Struct("<QHBB")
assert DIRENT.size == 12
