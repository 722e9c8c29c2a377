"""The converter's peak-memory report is the process's own, not inherited from whoever started it."""

import subprocess
import sys
import textwrap

MiB = 2**20

CHILD = textwrap.dedent("""
    import resource
    from dsv4_train.convert.host_memory import peak_rss
    print(peak_rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")

PARENT = textwrap.dedent("""
    import subprocess, sys
    block = bytearray(600 << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: 600 MiB resident
    del block
    sys.exit(subprocess.run([sys.executable, "-c", sys.argv[1]]).returncode)
""")


def test_peak_rss_is_not_the_parents_peak():
    # A real parent process that peaked at 600 MiB starts a small child (as the benchmark starts the CLI).
    out = subprocess.run([sys.executable, "-c", PARENT, CHILD], capture_output=True, text=True, check=True).stdout
    own_peak, maxrss = (int(x) for x in out.split())
    # The trap is real here: Linux carries the parent's 600 MiB into the child's ru_maxrss across exec.
    assert maxrss >= 600 * MiB, maxrss
    # The child itself (an interpreter and one small module, no torch) stays far below: 200 MiB leaves
    # room for any interpreter build and is still 3x below what the inherited figure would show.
    assert own_peak < 200 * MiB, own_peak
