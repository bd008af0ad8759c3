"""Multi-host start-up for `trainer`: one process per host, joined by jax.

`init_distributed` reads `--coordinator_address`, `--num_processes`,
`--process_id` (or their $JAX_* variables, or a detected SLURM job or TPU pod
slice) and starts jax's distributed runtime, saying in one line what went
wrong when the processes do not all join; `lost_a_process` tells a lost peer
from any other error.
"""

import contextlib
import errno
import inspect
import io
import os
import socket
import sys
import threading

from trax_hourglass.cli import supervise


_DISTRIBUTED_ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS',
                    'num_processes': 'JAX_NUM_PROCESSES',
                    'process_id': 'JAX_PROCESS_ID'}


def _int_setting(value, name, least):
  try:
    x = int(value)
  except (TypeError, ValueError):
    x = None
  if x is None or x < least:
    raise ValueError(f'{name}={value!r} must be an integer >= {least}')
  return x


def distributed_settings(args, environ=None):
  """Checked `(coordinator_address, num_processes, process_id)` from the flags,
  else the JAX_* variables of `environ` (default os.environ); None if neither."""
  environ = os.environ if environ is None else environ
  found = {}
  for name, env in _DISTRIBUTED_ENV.items():
    value, source = getattr(args, name), f'--{name}'
    if value is None and environ.get(env):
      value, source = environ[env], f'${env}'
    found[name] = (value, source)
  address, address_source = found['coordinator_address']
  if address is not None:
    host, _, port = address.rpartition(':')
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f'{address_source}={address!r} must be host:port with '
                       'a port 1..65535, e.g. 10.0.0.1:8476 (process 0\'s '
                       'host)')
  n, n_source = found['num_processes']
  if n is not None:
    n = _int_setting(n, n_source, 1)
  i, i_source = found['process_id']
  if i is not None:
    i = _int_setting(i, i_source, 0)
    if n is not None and i >= n:
      raise ValueError(f'{i_source}={i} must be below {n_source}={n} '
                       f'(0..{n - 1})')
  return address, n, i


def _detected_cluster():
  """The jax cluster environment (SLURM, TPU pod, ...) this runs in, or None."""
  from jax._src import clusters  # pylint: disable=g-import-not-at-top
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env
    except Exception:  # pylint: disable=broad-except
      continue  # e.g. a Kubernetes pod without the kubernetes package.
  return None


def init_distributed(args, environ=None):
  """Starts JAX's distributed runtime when this is one of several processes.

  From the flags or JAX_* environment variables, else by jax's own detection
  of a multi-process cluster (SLURM, TPU pod slice, Open MPI); otherwise (one
  process) does nothing. Must run before any jax computation.

  Returns:
    The number of processes.
  """
  settings = distributed_settings(args, environ)
  timeout = _int_setting(args.heartbeat_timeout, '--heartbeat_timeout', 2)
  join_timeout = _int_setting(getattr(args, 'coordinator_timeout', 300),
                              '--coordinator_timeout', 1)
  if settings[1] == 1:
    return 1  # Said to be alone.
  if None in settings and _detected_cluster() is None:
    if settings == (None, None, None):
      return 1  # The default: one process.
    missing = [f'--{name} (${env})' for (name, env), value in zip(
        _DISTRIBUTED_ENV.items(), settings) if value is None]
    raise ValueError(
        'multi-host training needs --coordinator_address, --num_processes '
        'and --process_id (no cluster detected to supply them); missing '
        f'{", ".join(missing)}')
  import jax  # pylint: disable=g-import-not-at-top
  # Collectives between CPU processes (none by default in jax 0.4.x); the
  # accelerators bring their own.
  if jax.config.values.get('jax_cpu_collectives_implementation') == 'none':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  # jax 0.12's CPU collectives wait forever when the processes' programs
  # differ only in the Python call stack recorded in them (process 0 trains
  # from another line than the rest): record no call stacks.
  if 'jax_traceback_in_locations_limit' in jax.config.values:
    jax.config.update('jax_traceback_in_locations_limit', 0)
  # Bound how long a process waits for a lost one: jax 0.4.x has heartbeat
  # settings only on its internal initialize (the public one checks that jax
  # was not used yet, so check that here too).
  interval = max(1, min(10, timeout // 5))
  heartbeats = dict(service_heartbeat_interval_seconds=interval,
                    service_max_missing_heartbeats=timeout // interval,
                    client_heartbeat_interval_seconds=interval,
                    client_max_missing_heartbeats=timeout // interval)
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    init = distributed.global_state.initialize
    internal = (set(heartbeats) <= set(inspect.signature(init).parameters)
                and not xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    internal = False
  if not internal:
    init = jax.distributed.initialize
    # Newer jax: one heartbeat timeout, in the public initialize.
    accepted = inspect.signature(init).parameters
    heartbeats = ({'heartbeat_timeout_seconds': timeout}
                  if 'heartbeat_timeout_seconds' in accepted else {})
  if 'initialization_timeout' in inspect.signature(init).parameters:
    # jax aborts (a C++ stack dump) when it gives up: the watchdog below
    # says it first, in one line.
    heartbeats['initialization_timeout'] = join_timeout + 60
  if settings[0] is not None and settings[2] == 0:
    _check_coordinator_port_free(settings[0])
  with _joining(settings, join_timeout):
    init(*settings, **heartbeats)
  return jax.process_count()


def _check_coordinator_port_free(address):
  """Process 0 serves the coordinator on its port: refuse one in use (jax
  aborts), e.g. by a second process given --process_id 0."""
  port = int(address.rpartition(':')[2])
  with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET,
                     socket.SOCK_STREAM) as s:
    try:
      s.bind(('', port))  # All interfaces, as jax's service binds.
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return  # Not ours to judge (no IPv6 here, ...): jax will say.
      raise ValueError(
          f'--process_id=0 serves the coordinator at {address}, but port '
          f'{port} is in use on this host: by another process 0 of this '
          'run (give each process its own --process_id 0..num_processes-1) '
          'or another program (pick a free port).') from None


@contextlib.contextmanager
def _joining(settings, timeout):
  """Says what this process waits for; ends it with one line after `timeout`.

  jax's initialize blocks (without the GIL) until every process has joined
  the coordinator, and after its own timeout aborts the process with a C++
  stack dump; an unreachable coordinator or a process id given twice are
  both only that wait.
  """
  address, n, i = settings
  where = address or 'the address the cluster gives'
  if i == 0:
    print(f'Process 0 of {n}: coordinating at {where}; waiting up to '
          f'{timeout} s for the other {n - 1} process(es) to join '
          '(--coordinator_timeout).', flush=True)
    problem = (f'the other processes did not all join the coordinator at '
               f'{where} within {timeout} s')
  else:
    who = f'Process {i} of {n}' if i is not None else 'This process'
    print(f'{who}: joining the coordinator at {where} (process 0); waiting '
          f'up to {timeout} s for all {n or "the"} processes '
          '(--coordinator_timeout).', flush=True)
    problem = (f'{who.lower()} could not join the coordinator at {where} '
               f'with all the other processes within {timeout} s')

  def give_up():
    print(f'trainer: error: {problem}: start every process with the same '
          '--coordinator_address (process 0\'s host:port, reachable from '
          'every host) and --num_processes, each with its own --process_id '
          '0..num_processes-1 (a second process given an id takes the '
          'first one\'s place), or raise --coordinator_timeout.',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    yield
  finally:
    watchdog.cancel()


def lost_a_process(error):
  """Whether `error` is a collective or the runtime failing on a lost peer."""
  text = str(error)
  # jax raises XlaRuntimeError, JaxRuntimeError or (0.10: a gloo collective)
  # ValueError: the text says.
  return type(error).__name__ in ('XlaRuntimeError', 'JaxRuntimeError',
                                  'ValueError', 'RuntimeError') and any(
      s in text for s in ('Gloo', 'gloo', 'Connection reset', 'heartbeat',
                          'coordination service', 'NCCL', 'DEADLINE_EXCEEDED'))


def lost_contact_line(i, n, detail):
  """The one line a process prints when another one of the run is gone."""
  first_line = (str(detail).strip().splitlines() or [''])[0].rstrip('.') + '.'
  return (f'trainer: error: process {i} of {n} lost contact with another '
          'training process (it stopped or its host is unreachable): '
          f'{first_line} Relaunch all the processes to resume from the last '
          'checkpoint.')


def one_of_several(argv, parse_args):
  """(process index, count) when this process should run under a parent
  (`cli.supervise`): one of several, not yet supervised; else None."""
  if os.environ.get(supervise.CHILD_ENV):
    return None
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      args = parse_args(argv)
    _, n, i = distributed_settings(args)
    if n is None and i is None and _detected_cluster() is not None:
      return (None, None)
  except (Exception, SystemExit):  # pylint: disable=broad-except
    return None  # The unsupervised run says what is wrong, in one line.
  return (i, n) if n is not None and n > 1 else None
