"""host_memory: when an entry point restarts itself with glibc's hugetlb tunable, and that
the restart keeps the command, its arguments and the process."""

import os
import platform
import subprocess
import sys

import pytest

from noah_jax.train import host_memory
from noah_jax.train.host_memory import TUNABLE, restart_needed, thp_mode, with_tunable

GLIBC = (2, 36)


@pytest.mark.parametrize("environ,mode,glibc,expected", [
    ({}, "madvise", GLIBC, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=3"}, "madvise", GLIBC, True),
    ({"GLIBC_TUNABLES": TUNABLE}, "madvise", GLIBC, False),              # already set
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, False),  # user's choice
    ({"NOAH_JAX_HUGE_PAGES": "0"}, "madvise", GLIBC, False),             # opted out
    ({"NOAH_JAX_HUGE_PAGES": "1"}, "madvise", GLIBC, True),
    ({}, "always", GLIBC, False),     # every large mapping gets huge pages already
    ({}, "never", GLIBC, False),
    ({}, None, GLIBC, False),         # no THP file: not Linux
    ({}, "madvise", (2, 34), False),  # the tunable came with glibc 2.35
    ({}, "madvise", (2, 35), True),
    ({}, "madvise", None, False),     # musl and others
])
def test_restart_only_where_the_tunable_would_give_huge_pages(environ, mode, glibc, expected):
    assert restart_needed(environ, mode, glibc) is expected


def test_tunable_is_added_to_the_users_tunables():
    assert with_tunable("") == TUNABLE
    assert with_tunable("glibc.malloc.check=3") == f"glibc.malloc.check=3:{TUNABLE}"


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert thp_mode(str(path)) == "always"
    assert thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_is_this_interpreters():
    version = host_memory.glibc_version()
    libc, number = platform.libc_ver()
    if libc == "glibc":
        assert version == tuple(int(p) for p in number.split(".")[:2])
    else:
        assert version is None


def test_restart_keeps_the_command_arguments_and_process(tmp_path):
    """A `python -m` command with arguments, in a pretend `madvise` system: it prints its
    pid and arguments, restarts once in place with the tunable, and runs to the end."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "from noah_jax.train import host_memory\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)\n"
        "host_memory.thp_mode = lambda: 'madvise'\n"
        "host_memory.glibc_version = lambda: (2, 36)\n"
        "host_memory.use_huge_pages()\n"
        "print('end', os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "NOAH_JAX_HUGE_PAGES")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), os.getcwd(), env.get("PYTHONPATH", "")])
    env["GLIBC_TUNABLES"] = "glibc.malloc.check=0"
    out = subprocess.run([sys.executable, "-m", "probe", "--flag=a b", "x"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    lines = out.splitlines()
    assert len(lines) == 3, out   # start, start again after the restart, end: no loop
    pid = lines[0].split()[1]
    assert lines[0] == f"start {pid} glibc.malloc.check=0 ['--flag=a b', 'x']"
    assert lines[1] == f"start {pid} glibc.malloc.check=0:{TUNABLE} ['--flag=a b', 'x']"
    assert lines[2] == f"end {pid} glibc.malloc.check=0:{TUNABLE} ['--flag=a b', 'x']"
    # Opted out: no restart.
    env["NOAH_JAX_HUGE_PAGES"] = "0"
    out = subprocess.run([sys.executable, "-m", "probe"], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert [line.split()[0] for line in out.splitlines()] == ["start", "end"]
