"""The section names of a compiled module, read without binutils (tests/test_setup.py, tests/test_wheels.py)."""

from __future__ import annotations

import struct
from pathlib import Path


def elf_section_names(path: Path) -> set[str]:
    """The section names of a 64-bit little-endian ELF file (no readelf needed)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF file"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = headers[shstrndx][4]  # sh_offset of the section-name table
    return {data[strtab + h[0] : data.index(b"\0", strtab + h[0])].decode() for h in headers}
