"""Transparent huge pages for the host buffers of XLA's CPU programs.

XLA on CPU allocates the temporary buffers of each run of a compiled program afresh
(gigabytes for a training step of the larger models), and glibc serves allocations
that large with a new memory mapping each time, so every step touches every page of
them for the first time, one 4 KiB page fault at a time. With the glibc tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) malloc asks for transparent huge pages
on those mappings (2 MiB pages), which the kernel grants where its THP mode is
`madvise`, the usual default. README.md ("Performance") and
benchmarks/results/cpu_huge_pages/ give the measured faults and step times.

glibc reads its tunables once, when a process starts. So `use_huge_pages()`, called
first thing by the command-line entry points (main.py, `noah_jax.study`,
`noah_jax.benchmark`), starts the same command again in place (`os.execv`: same process
id, arguments and environment, plus the tunable) when that would help and the tunable is
not set yet; it does nothing on other systems, under THP modes `always` (huge pages
already) or `never`, or with NOAH_JAX_HUGE_PAGES=0 in the environment.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "NOAH_JAX_HUGE_PAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the running glibc, or None elsewhere (musl, macOS, Windows)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError, TypeError):
        return None


def thp_mode(path: str = THP_MODE_FILE) -> Optional[str]:
    """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def restart_needed(environ: Mapping[str, str], mode: Optional[str],
                   glibc: Optional[tuple[int, int]]) -> bool:
    """Whether starting again with the tunable would give this process huge pages."""
    if environ.get(OPT_OUT, "1") == "0" or mode != "madvise":
        return False
    if glibc is None or glibc < (2, 35):
        return False
    return "glibc.malloc.hugetlb=" not in environ.get("GLIBC_TUNABLES", "")


def with_tunable(tunables: str) -> str:
    """GLIBC_TUNABLES with the hugetlb tunable added to any already there."""
    return f"{tunables}:{TUNABLE}" if tunables else TUNABLE


def use_huge_pages() -> None:
    """Restarts this command in place with glibc.malloc.hugetlb=1 where that helps (see
    the module docstring); otherwise returns at once."""
    if not restart_needed(os.environ, thp_mode(), glibc_version()):
        return
    os.environ["GLIBC_TUNABLES"] = with_tunable(os.environ.get("GLIBC_TUNABLES", ""))
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.orig_argv is the command as started (`python -m noah_jax.study ...` included).
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
