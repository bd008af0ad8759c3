"""Resident memory of processes, in MiB (Linux: /proc and rusage in KiB)."""

import resource


def proc_rss_mib(pid):
  """Current resident set size of process `pid` in MiB, or None if unreadable."""
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024.  # Reported in kB.
  except (OSError, ValueError, IndexError):
    pass  # Not Linux, or the process is exiting.
  return None


def rusage_peak_mib(rusage):
  """Peak resident memory of a `resource.getrusage`/`os.wait4` rusage."""
  return rusage.ru_maxrss / 1024.  # KiB on Linux.


def self_peak_rss_mib():
  return rusage_peak_mib(resource.getrusage(resource.RUSAGE_SELF))
