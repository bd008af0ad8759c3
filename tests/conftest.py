"""Shared pytest fixtures for trax_hourglass tests."""

import os
import random
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

# Before any test module's `import trax`: the package makes trax's import fast
# (trax calls inspect.stack() per layer at import: ~60 s of collection on 3.13).
import trax_hourglass  # pylint: disable=unused-import,g-bad-import-order

from configurations import FAST_COMPILE_XLA_FLAGS  # pylint: disable=g-bad-import-order

# Set before jax starts; a caller's own XLA_FLAGS win.
os.environ.setdefault('XLA_FLAGS', FAST_COMPILE_XLA_FLAGS)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _seed_from(name):
  """Seeds Python's and numpy's global generators from a stable digest of `name`.

  trax draws every layer's seed from Python's `random` when the layer is made,
  so a model built without an explicit rng would otherwise get weights that
  depend on what ran before it in the process (and on the process's start).
  """
  seed = zlib.crc32(name.encode())
  random.seed(seed)
  np.random.seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef, request):
  """Each fixture (a shared model too) is made from generators seeded by its own
  name and scope, so it is the same in any test order or selection."""
  _seed_from(f'{request.node.nodeid}::{fixturedef.argname}')
  yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  """Each test body starts from generators seeded by its own id."""
  _seed_from(item.nodeid)
  yield


@pytest.fixture
def run_python():
  """Runs Python source in a fresh interpreter; returns its stdout.

  The child starts without the caller's `XLA_FLAGS` (so jax sees its default
  devices), compiling as quickly as the tests do, plus the `XLA_FLAGS` of
  `env`, e.g. to fake several CPU devices.
  """

  def run(source, env=None, timeout=300):
    env = dict(env or {})
    child_env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    child_env['PYTHONPATH'] = os.pathsep.join(
        [REPO] + [p for p in [os.environ.get('PYTHONPATH')] if p])
    child_env.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
    child_env['XLA_FLAGS'] = ' '.join(
        [FAST_COMPILE_XLA_FLAGS, env.pop('XLA_FLAGS', '')]).strip()
    child_env.update(env)
    result = subprocess.run([sys.executable, '-c', textwrap.dedent(source)],
                            cwd=REPO, env=child_env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout

  return run
