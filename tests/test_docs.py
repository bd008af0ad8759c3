"""The README and docs name only files that exist and commands that parse.

Every repository path and relative link (with its #anchor) must resolve, and every
command shown (`python benchmarks/...`, `python -m trax_hourglass...`, `trainer`,
`hourglass-eval`, `hourglass-sample`) must name an existing script whose `--help`
lists each flag the command passes.
"""

import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = sorted(['README.md', 'benchmarks/README.md'] + [
    os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'docs', '*.md'))])
_TOP = ('trax_hourglass', 'gin', 'benchmarks', 'docs', 'notebooks', 'constraints',
        'scripts', 'tests', '.ci')
_PATH = re.compile(r'^(?:%s)/[\w./-]*[\w/]$' % '|'.join(re.escape(t) for t in _TOP))
_CLI = {'trainer': 'trax_hourglass.cli.trainer',
        'hourglass-eval': 'trax_hourglass.cli.evaluate',
        'hourglass-sample': 'trax_hourglass.cli.sample'}


def _read(doc):
  with open(os.path.join(REPO, doc), encoding='utf-8') as f:
    return f.read()


def _slug(heading):
  """GitHub's anchor of a markdown heading."""
  text = re.sub(r'[^\w\- ]', '', heading.strip().lower())
  return text.replace(' ', '-')


def _anchors(doc):
  return {_slug(m.group(1)) for m in re.finditer(r'^#+ (.+)$', _read(doc), re.M)}


def _code_spans(text):
  """Fenced blocks' lines (continuations joined) and inline `code` spans."""
  spans = []
  for block in re.findall(r'^```[a-z]*\n(.*?)^```', text, re.M | re.S):
    spans += block.replace('\\\n', ' ').splitlines()
  text = re.sub(r'^```.*?^```', '', text, flags=re.M | re.S)
  spans += re.findall(r'`([^`\n]+)`', text.replace('\n', ' '))
  return spans


def _commands(doc):
  """(program, argv) of each shell command shown in `doc`."""
  found = []
  for span in _code_spans(_read(doc)):
    span = re.sub(r'\s+#.*$', '', span).replace('[the same flags]', '')
    for part in re.split(r'\s+&&\s+', span.strip()):
      try:
        words = shlex.split(part)
      except ValueError:
        continue
      if len(words) >= 2 and words[0] == 'python':
        if words[1] == '-m' and len(words) > 2:
          found.append((words[2], words[3:]))
        elif words[1].endswith('.py'):
          found.append((words[1], words[2:]))
      elif words and words[0] in _CLI:
        found.append((_CLI[words[0]], words[1:]))
  return found


@functools.lru_cache(maxsize=None)
def _help(program):
  argv = ([sys.executable, program] if program.endswith('.py') else
          [sys.executable, '-m', program])
  env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run(argv + ['--help'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, (program, result.stderr[-2000:])
  return result.stdout


def _program_exists(program):
  if program.endswith('.py'):
    return os.path.isfile(os.path.join(REPO, program))
  return os.path.isfile(os.path.join(REPO, *program.split('.')) + '.py')


@pytest.mark.parametrize('doc', DOCS)
def test_named_paths_exist(doc):
  text = _read(doc)
  missing = []
  for span in _code_spans(text):
    for word in re.split(r'[\s=,()\'"]+', span):
      word = word.rstrip('.:;')
      if _PATH.match(word) and '*' not in word and not os.path.exists(
          os.path.join(REPO, word)):
        missing.append(word)
  for target in re.findall(r'\]\(([^)\s]+)\)', text):
    if re.match(r'^[a-z]+:', target):
      continue  # A web address.
    path, _, anchor = target.partition('#')
    resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) \
        if path else os.path.join(REPO, doc)
    if not os.path.exists(resolved):
      missing.append(target)
    elif anchor and resolved.endswith('.md') and anchor not in _anchors(
        os.path.relpath(resolved, REPO)):
      missing.append(target)
  assert not missing, f'{doc} names what does not exist: {missing}'


def test_every_command_shown_parses():
  commands = [(doc, program, argv) for doc in DOCS
              for program, argv in _commands(doc)]
  assert len(commands) > 10  # The parser found the docs' commands.
  problems = []
  for doc, program, argv in commands:
    if not _program_exists(program):
      problems.append(f'{doc}: {program} does not exist')
      continue
    flags = {a.split('=')[0] for a in argv if a.startswith('--')}
    usage = _help(program)
    problems += [f'{doc}: {program} has no {flag}' for flag in sorted(flags)
                 if not re.search(re.escape(flag) + r'\b', usage)]
  assert not problems, '\n'.join(problems)
