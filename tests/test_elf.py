"""prefetch.elf: which parts of a big shared library the dynamic loader reads, from its
headers; and the heuristic that fetches just those on the library's first read."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from casfs.store import open_store
from casfs.testing.ocibuild import file, write_oci_layout
from prefetch.elf import DYN, EHDR, PHDR, parse_headers
from tests.fakes import RecordingFetcher
from tests.treecheck import index

MIB = 1 << 20
RW_OFF, RW_LEN = 9 * MIB + 100, 300_000  # the writable segment
DYN_OFF = RW_OFF + 1000  # PT_DYNAMIC, inside it
SHIFT = 0x1000  # the writable segment's vaddr - offset
TABLES = {6: (0x300, None), 5: (0x4000, 0x20000), 0x6FFFFEF5: (0x30000, None),
          7: (0x40000, 2 * MIB), 23: (0x40000 + 2 * MIB, 500_000)}  # tag: (vaddr, size)


def make_elf(size: int = 12 * MIB) -> bytes:
    buf = bytearray(size)
    phdrs = [(1, 5, 0, 0, 0, RW_OFF, RW_OFF, 0x1000),  # R E
             (1, 6, RW_OFF, RW_OFF + SHIFT, 0, RW_LEN, RW_LEN + 5000, 0x1000),  # RW
             (2, 6, DYN_OFF, DYN_OFF + SHIFT, 0, 16 * 12, 16 * 12, 8)]
    EHDR.pack_into(buf, 0, b"\x7fELF\x02\x01\x01" + bytes(9), 3, 62, 1, 0, 64, 0, 0, 64,
                   PHDR.size, len(phdrs), 64, 0, 0)
    for i, ph in enumerate(phdrs):
        PHDR.pack_into(buf, 64 + i * PHDR.size, *ph)
    entries = []
    for tag, (vaddr, length) in TABLES.items():
        entries.append((tag, vaddr))
        size_tag = {5: 10, 7: 8, 23: 2}.get(tag)
        if size_tag is not None:
            entries.append((size_tag, length))
    entries.append((0, 0))
    for i, e in enumerate(entries):
        DYN.pack_into(buf, DYN_OFF + i * DYN.size, *e)
    return bytes(buf)


def test_loader_parts_of_a_library() -> None:
    data = make_elf()
    layout = parse_headers(data[:4096], len(data))
    assert layout is not None
    assert layout.writable() == [(RW_OFF, RW_LEN)]
    assert layout.dynamic == (DYN_OFF, 16 * 12)
    off, n = layout.dynamic
    # From the first table (DT_SYMTAB) to the end of the last (DT_JMPREL + DT_PLTRELSZ).
    assert layout.tables(data[off : off + n]) == (0x300, 0x40000 + 2 * MIB + 500_000 - 0x300)


@pytest.mark.parametrize("damage", ["not elf", "32-bit", "big-endian", "phdrs past head",
                                    "segment past end", "no load"])
def test_malformed_headers_give_nothing(damage: str) -> None:
    data = bytearray(make_elf())
    size = len(data)
    if damage == "not elf":
        data[:4] = b"MZ\0\0"
    elif damage == "32-bit":
        data[4] = 1
    elif damage == "big-endian":
        data[5] = 2
    elif damage == "phdrs past head":
        struct.pack_into("<Q", data, 0x20, 4090)
    elif damage == "segment past end":
        size = RW_OFF
    else:
        for i in range(2):
            struct.pack_into("<I", data, 64 + i * PHDR.size, 4)  # PT_NOTE
    assert parse_headers(bytes(data[:4096]), size) is None


def test_absurd_table_span_is_ignored() -> None:
    data = make_elf()
    layout = parse_headers(data[:4096], len(data))
    assert layout is not None
    dyn = DYN.pack(6, 0x300) + DYN.pack(7, 0x400) + DYN.pack(8, 1 << 40) + DYN.pack(0, 0)
    assert layout.tables(dyn) is None


def test_heuristic_fetches_loader_parts_of_a_big_library(tmp_path: Path) -> None:
    """The first read of a library too big to take whole (at offset 0, the loader's)
    fetches the chunks of its writable segment and loader tables, no others."""
    from prefetch.heuristics import Heuristics

    data = make_elf()
    write_oci_layout(tmp_path / "img", [[file("lib/libbig.so", data)]], tag="v")
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    _, m = index(f"oci:{tmp_path / 'img'}:v", store)
    ino = m.resolve("/lib/libbig.so")
    chunks = m.chunks(ino)

    fetcher = RecordingFetcher(store)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, library_max_size=MIB)  # type: ignore[arg-type]
            h.on_read(ino, chunks[:1])
            await trio.testing.wait_all_tasks_blocked()

    trio.run(scenario)
    span = (0x300, 0x40000 + 2 * MIB + 500_000)
    want = {c.digest for c in chunks
            if c.offset < span[1] and c.offset + c.length > span[0]
            or c.offset < RW_OFF + RW_LEN and c.offset + c.length > RW_OFF}
    assert set(fetcher.got) == want
    assert len(want) < len(chunks) / 2, "not the whole library"


def test_loader_parts_are_capped(tmp_path: Path) -> None:
    """A library whose writable segment spans all of it (or a hostile one) is not
    fetched whole: each loader part is cut at library_max_size."""
    from prefetch.heuristics import Heuristics

    data = bytearray(make_elf())
    # The writable segment now covers the whole file.
    PHDR.pack_into(data, 64 + PHDR.size, 1, 6, 0, 0, 0, len(data), len(data), 0x1000)
    write_oci_layout(tmp_path / "img", [[file("lib/libbig.so", bytes(data))]], tag="v")
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    _, m = index(f"oci:{tmp_path / 'img'}:v", store)
    ino = m.resolve("/lib/libbig.so")
    fetcher = RecordingFetcher(store)

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, library_max_size=MIB)  # type: ignore[arg-type]
            h.on_read(ino, m.chunks(ino)[:1])
            await trio.testing.wait_all_tasks_blocked()

    trio.run(scenario)
    chunk = m.chunks(ino)[0].length
    assert 0 < len(set(fetcher.got)) <= 2 * MIB // chunk + 2  # two parts of at most 1 MiB
