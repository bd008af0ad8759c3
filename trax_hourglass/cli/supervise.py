"""One of several training processes, run under a small parent that reports it.

jax's distributed runtime ends a process by `abort()` with a C++ stack dump
when its coordination service reports a lost process (or the coordinator
itself is gone), from a runtime thread and wherever the Python code is (a
failed collective is a Python error the trainer reports, but a process between
collectives, or any process that loses process 0, aborts). The callback jaxlib
offers in place of the abort cannot be given from Python (its status argument
does not convert), so the trainer of a multi-process run starts itself as a
child of a parent that relays the child's stderr and, when the child aborts
after such a report, says so in the trainer's one line and exits 1.

The parent forwards SIGTERM/SIGINT/SIGHUP to the child (which saves and stops)
and the child dies with the parent (a killed parent leaves no orphan).
"""

import ctypes
import os
import re
import signal
import subprocess
import sys

# Set in the child: it trains; the parent only watches.
CHILD_ENV = 'TRAX_HOURGLASS_SUPERVISED'
# An absl log line from jax's runtime (severity E or F) about the coordination
# service: from here on a lost-process abort is what follows.
_LOST = re.compile(
    rb'^[EF]\d{4} [\d:.]+\s+\d+ [^\]]*\] .*(coordination service|distributed '
    rb'service|[Hh]eartbeat)')
_ABSL_PREFIX = re.compile(rb'^[EFWI]\d{4} [\d:.]+\s+\d+ [^\]]*\] ')


def run(argv, who, lost_line, debug=False):
  """Runs `python -m trax_hourglass.cli.trainer *argv` as a child; its code.

  Args:
    argv: the trainer's command-line arguments.
    who: (process index, process count), for the message; None when unknown.
    lost_line: (i, n, detail) -> the one line for a lost process.
    debug: relay the runtime's stack dump too.
  """
  env = dict(os.environ, **{CHILD_ENV: '1'})
  child = subprocess.Popen(
      [sys.executable, '-m', 'trax_hourglass.cli.trainer', *argv], env=env,
      stderr=subprocess.PIPE, preexec_fn=_die_with_parent(os.getpid()))
  forwarded = {s: signal.signal(s, lambda signum, _: child.send_signal(signum))
               for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
  relay = Relay(sys.stderr.buffer, hold=not debug)
  try:
    for line in iter(child.stderr.readline, b''):
      relay.feed(line)
    code = child.wait()
  finally:
    for s, handler in forwarded.items():
      signal.signal(s, handler)
  return relay.finish(code, who, lost_line)


class Relay:
  """Copies the child's stderr lines; holds back a lost-process stack dump."""

  def __init__(self, out, hold=True):
    self._out, self._hold = out, hold
    self.held, self.reason = [], None

  def feed(self, line):
    if self.reason is None and _LOST.match(line):
      self.reason = _ABSL_PREFIX.sub(b'', line).decode('utf-8', 'replace')
    if self.reason is not None and self._hold:
      self.held.append(line)
      if line.startswith(b'F'):  # The fatal line names the cause best.
        self.reason = _ABSL_PREFIX.sub(b'', line).decode('utf-8', 'replace')
    else:
      self._out.write(line)
      self._out.flush()

  def finish(self, code, who, lost_line):
    """The exit code for the child's `code`, after the last line."""
    if code != 0 and self.reason is not None:
      # One line: the child's own (it may still get to say it, racing the
      # runtime's abort), else ours.
      own = [l for l in self.held if l.startswith(b'trainer: error: ')]
      i, n = who or ('?', '?')
      self._out.write(own[-1] if own else
                      lost_line(i, n, self.reason).encode() + b'\n')
      self._out.flush()
      return 1
    self._out.writelines(self.held)  # Not a lost process: show all of it.
    self._out.flush()
    return 128 - code if code < 0 else code


def _die_with_parent(parent):
  """preexec_fn: the child gets SIGKILL when its parent dies (Linux)."""
  def set_death_signal():
    try:
      libc = ctypes.CDLL(None, use_errno=True)
      libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
      return  # Not Linux: an orphan ends when its peers' collectives fail.
    if os.getppid() != parent:  # The parent died before prctl.
      os._exit(1)  # pylint: disable=protected-access
  return set_death_signal
