"""The parent of a site's SuperNode: a process with one thread, so that the SuperNode learns
once, not many times, that its site died.

`python -m ultrajax.fl.client` starts `python -m ultrajax.fl.guard flower-supernode ...` in a
session of its own, and the guard starts the SuperNode. Without it the server noticed a killed
site only about 60 s later, for this reason. Linux sends a child its parent-death signal
(PR_SET_PDEATHSIG) whenever the thread that is its parent exits, and hands the child to another
thread of the same process first. A site process has dozens of threads (JAX, absl, httpx), so a
SuperNode whose parent is the site is sent one SIGTERM per thread when the site is killed.
Flower's SuperNode handles the first (a graceful exit, in which it tells the SuperLink it
leaves) and restores the default action, so the second kills it before it has told anyone. The
server then waits for the node's heartbeats to expire (2 x 30 s) before it sends the round
again. The guard passes the first SIGTERM, SIGINT or SIGHUP on and waits for the SuperNode to
end.

The guard's own session keeps the SuperNode out of the site's process group: a Ctrl-C in the
site's terminal reaches the site alone, which stops the guard, which stops the SuperNode, each
once.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
  """In a child process (a Popen preexec_fn): receive `sig` when the parent dies, however it
  dies. Linux only (prctl); elsewhere the child outlives a killed parent. Linux sends `sig`
  again for each of the parent's threads that exits: a child that handles `sig` once needs a
  parent with one thread (this module)."""
  prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
  if prctl is not None:
    prctl(1, sig)  # PR_SET_PDEATHSIG


def start(command: list[str]) -> subprocess.Popen:
  """Starts `command` under a guard, in a session of its own; the guard gets SIGTERM when the
  caller dies. `.terminate()` on the result stops the command once, gracefully; the guard's
  exit status is the command's. A command not on PATH is a FileNotFoundError here."""
  if shutil.which(command[0]) is None:
    raise FileNotFoundError(f"{command[0]!r} is not on PATH (PATH={os.environ.get('PATH', '')})")
  return subprocess.Popen(  # noqa: PLW1509 (preexec_fn: only prctl, before exec)
    [sys.executable, "-m", "ultrajax.fl.guard", *command],
    preexec_fn=die_with_parent,
    start_new_session=True,
  )


def main(command: list[str]) -> int:
  """Runs `command` as this process's child and passes the first stop signal on to it as
  SIGTERM; later ones are ignored. The child is SIGKILLed if this process is. Returns its exit
  status (128 + n if signal n ended it)."""
  kill_with_me = lambda: die_with_parent(signal.SIGKILL)
  child = subprocess.Popen(command, preexec_fn=kill_with_me)  # noqa: PLW1509

  def stop(*_) -> None:
    for sig in STOP_SIGNALS:
      signal.signal(sig, signal.SIG_IGN)
    child.terminate()

  for sig in STOP_SIGNALS:
    signal.signal(sig, stop)
  status = child.wait()
  return 128 - status if status < 0 else status  # killed by signal n: 128 + n, as a shell says


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
