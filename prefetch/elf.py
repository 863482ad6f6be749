"""What the dynamic loader reads of a shared library before any of its code runs.

A library too big to fetch whole on a first boot (libtorch_cpu.so: 434 MB) is otherwise
fetched a page fault at a time, in series: ld.so maps it, then walks its dynamic section,
symbol and string tables, hash table and relocations, and writes every relocated pointer
into the writable segment. Those parts are known from the ELF headers alone, so they can
be fetched ahead, right after the loader reads the first page:

1. the program headers (in the first page) give the writable PT_LOAD segments (GOT,
   .data.rel.ro, .init_array; relocations write all over them) and PT_DYNAMIC;
2. the dynamic section gives the addresses of the tables the loader reads
   (DT_SYMTAB, DT_STRTAB/DT_STRSZ, DT_GNU_HASH, DT_VERSYM, DT_RELA/DT_RELASZ,
   DT_REL/DT_RELSZ, DT_RELR/DT_RELRSZ, DT_JMPREL/DT_PLTRELSZ), which linkers lay out
   back to back at the start of the file: one span from the first to the end of the last.

ELF64 little-endian only (what x86-64 and aarch64 Linux images hold); anything else, or
anything malformed, yields nothing. Pure parsing, no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
DYN = struct.Struct("<qQ")
PT_LOAD, PT_DYNAMIC = 1, 2
PF_W = 2
MAX_SPAN = 256 << 20  # a larger "table span" is not a loader's tables: ignore it

# (address tag, size tag or None): a table's size, where the ELF gives it.
_TABLES = {
    6: None,  # DT_SYMTAB (ends where the next table starts)
    5: 10,  # DT_STRTAB, DT_STRSZ
    0x6FFFFEF5: None,  # DT_GNU_HASH
    0x6FFFFFF0: None,  # DT_VERSYM
    7: 8,  # DT_RELA, DT_RELASZ
    17: 18,  # DT_REL, DT_RELSZ
    36: 35,  # DT_RELR, DT_RELRSZ
    23: 2,  # DT_JMPREL, DT_PLTRELSZ
}


@dataclass
class Segment:
    offset: int
    vaddr: int
    filesz: int
    writable: bool


@dataclass
class ElfLayout:
    loads: list[Segment]
    dynamic: tuple[int, int] | None  # (file offset, size) of PT_DYNAMIC

    def writable(self) -> list[tuple[int, int]]:
        """File ranges (offset, length) of the segments relocation writes into."""
        return [(s.offset, s.filesz) for s in self.loads if s.writable and s.filesz]

    def file_offset(self, vaddr: int) -> int | None:
        for s in self.loads:
            if s.vaddr <= vaddr < s.vaddr + s.filesz:
                return vaddr - s.vaddr + s.offset
        return None

    def tables(self, dynamic: bytes) -> tuple[int, int] | None:
        """The file range from the first loader table to the end of the last, given
        the bytes of the dynamic section."""
        values: dict[int, int] = {}
        for i in range(len(dynamic) // DYN.size):
            tag, val = DYN.unpack_from(dynamic, i * DYN.size)
            if tag == 0:
                break
            values.setdefault(tag, val)
        starts: list[int] = []
        ends: list[int] = []
        for addr_tag, size_tag in _TABLES.items():
            if addr_tag not in values:
                continue
            start = self.file_offset(values[addr_tag])
            if start is None:
                continue
            starts.append(start)
            ends.append(start + (values.get(size_tag, 0) if size_tag is not None else 0))
        if not starts:
            return None
        lo, hi = min(starts), max(max(ends), max(starts))
        if hi <= lo or hi - lo > MAX_SPAN:
            return None
        return lo, hi - lo


def parse_headers(head: bytes, file_size: int) -> ElfLayout | None:
    """The layout from a library's first bytes (which hold its program headers), or
    None when they are not those of an ELF64 little-endian shared object."""
    if len(head) < EHDR.size or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
        return None
    fields = EHDR.unpack_from(head)
    phoff, phentsize, phnum = fields[5], fields[9], fields[10]
    if phentsize != PHDR.size or not 0 < phnum <= 256 or phoff + phnum * PHDR.size > len(head):
        return None
    loads: list[Segment] = []
    dynamic = None
    for i in range(phnum):
        p_type, flags, offset, vaddr, _paddr, filesz, _memsz, _align = \
            PHDR.unpack_from(head, phoff + i * PHDR.size)
        if offset + filesz > file_size:
            return None
        if p_type == PT_LOAD:
            loads.append(Segment(offset, vaddr, filesz, bool(flags & PF_W)))
        elif p_type == PT_DYNAMIC and filesz:
            dynamic = (offset, min(filesz, 64 << 10))
    return ElfLayout(loads, dynamic) if loads else None
