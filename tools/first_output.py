"""How long a newcomer stares at a silent terminal: run a command on a pseudo-terminal (as in a
shell, so progress bars show) and report when its first output, and its first progress bar, appeared.

    python tools/first_output.py -- streamrecon demo --output-dir /tmp/demo
    python tools/first_output.py --json out.json -- streamrecon eval ../shared/data/sun3d_studyroom --max-frames 20

Prints ``first output s``, ``first progress s`` (the first line drawn by a tqdm bar or the run's
progress line), the longest silence between two outputs, and the total time.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

_PROGRESS = re.compile(rb"(\d+%\||\d+/\d+ \[|\[\s*\d+/\d+\]|\d+(\.\d+)? (fps|frame/s|step/s|it/s|s/frame|s/step))")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--echo", action="store_true", help="also pass the command's output through")
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("no command given")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120x40 terminal
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    first = first_progress = None
    last = t0
    longest = 0.0
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the command closed the terminal
            break
        if not chunk:
            break
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
        first = first if first is not None else now - t0
        if first_progress is None and _PROGRESS.search(chunk):
            first_progress = now - t0
        if args.echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
    proc.wait()
    total = time.monotonic() - t0
    longest = max(longest, time.monotonic() - last)
    report = {"command": " ".join(cmd), "returncode": proc.returncode, "first_output_s": first,
              "first_progress_s": first_progress, "longest_silence_s": longest, "total_s": total}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
