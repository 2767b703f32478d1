"""Which OS an executable is built for, from its ELF header (pyelftools).

FreeBSD's image activator picks the ABI from EI_OSABI (ELFOSABI_FREEBSD 9, ELFOSABI_LINUX 3,
set by `brandelf`), else from the GNU ABI-tag note, else from the interpreter path. A native
FreeBSD binary can only run on FreeBSD; a Linux binary runs on both (under the Linuxulator).
"""
from __future__ import annotations

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ...errors import BadImage, Unsupported

OSABI = {"ELFOSABI_FREEBSD": "freebsd", "ELFOSABI_LINUX": "linux"}
LINUX_INTERPRETERS = ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-musl-x86_64.so.1",
                      "/lib64/ld-linux.so.2")


def binary_os(path: str) -> str:
    """"linux" or "freebsd" for an x86-64 executable; BadImage if it is not one."""
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            if elf["e_machine"] != "EM_X86_64":
                raise Unsupported(f"{elf['e_machine']} executable: only x86-64 moves", path=path)
            osabi = elf["e_ident"]["EI_OSABI"]
            if osabi in OSABI:
                return OSABI[osabi]
            return _by_notes(elf)
    except ELFError as e:
        raise BadImage(f"not an ELF executable: {e}", path=path) from None


def _by_notes(elf) -> str:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_INTERP":
            return "linux" if seg.get_interp_name() in LINUX_INTERPRETERS else "freebsd"
        if seg["p_type"] == "PT_NOTE":
            for note in seg.iter_notes():
                if note["n_name"] == "FreeBSD":
                    return "freebsd"
                if note["n_name"] == "GNU" and note["n_type"] == "NT_GNU_ABI_TAG":
                    return "linux"
    return "linux"      # an unbranded static SysV binary: Linux is the only place it came from


def check_can_run(path: str, target_os: str) -> str:
    """The binary's OS; Unsupported if it cannot run on target_os."""
    kind = binary_os(path)
    if kind == "freebsd" and target_os != "freebsd":
        raise Unsupported("native FreeBSD binary (ELF OSABI FreeBSD): it cannot run on "
                          f"{target_os}; only Linux binaries move between the two", path=path)
    return kind
