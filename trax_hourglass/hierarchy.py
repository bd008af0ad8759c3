"""The hourglass hierarchy: which layers run at which shortening.

Two notations describe the same model:
  * trax's: `vanilla_layers=(2, 2), hierarchy='8@3'`;
  * the paper's: `hierarchy='2@1 8@3 2@1'` (the `@1` ends are the vanilla layers).
`'12@1'` alone is a plain Transformer of 12 full-length layers: the baseline that
differs from an hourglass only in the shortening.
In both, `n@k` means n layers at 1/k of the input length, and `k` is the *total*
shortening of that level, so `'1@2 2@6 1@2'` nests a level shortened by 3 inside a
level shortened by 2.
"""

import dataclasses
import re
from typing import Tuple

_LEVEL = re.compile(r'^(\d+)@(\d+)$')
_EXAMPLES = "'8@3', '2@1 8@3 2@1' (the paper's notation) or '1@2 2@6 1@2'"


@dataclasses.dataclass(frozen=True)
class Level:
  """One shortened level: `n_layers` before and after any deeper level."""
  n_layers: int
  shorten_factor: int  # Relative to the level outside it.
  total_factor: int  # Relative to the input tokens.


@dataclasses.dataclass(frozen=True)
class Hierarchy:
  """A parsed hierarchy: full-length layers around nested shortened levels."""
  vanilla_layers: Tuple[int, int]
  levels: Tuple[Level, ...]  # Outermost first.

  @property
  def total_factor(self):
    """Shortening of the innermost level: inputs are padded to a multiple of it."""
    return self.levels[-1].total_factor if self.levels else 1

  @property
  def shorten_factors(self):
    return tuple(level.shorten_factor for level in self.levels)


def _invalid(hierarchy, why):
  return ValueError(
      f'Invalid hierarchy {hierarchy!r}: {why}. A hierarchy is space-separated '
      f"'layers@factor' levels forming a palindrome, each factor a proper "
      f'multiple of the one outside it, e.g. {_EXAMPLES}.')


def parse_hierarchy(hierarchy, vanilla_layers=(1, 1)):
  """Parses `hierarchy` (trax's or the paper's notation) into a `Hierarchy`.

  Args:
    hierarchy: e.g. '8@3', '1@2 2@6 1@2', or '2@1 8@3 2@1'. When the outermost
      levels are `@1`, they are the full-length (vanilla) layers and replace
      `vanilla_layers`.
    vanilla_layers: (pre, post) full-length layers, used when `hierarchy` has
      no `@1` ends; with them, only the default (1, 1) or the same numbers.

  Returns:
    A `Hierarchy`.

  Raises:
    ValueError: naming the bad string or value and what a valid one looks like.
  """
  if not isinstance(hierarchy, str):
    raise _invalid(hierarchy, f'expected a string, got {type(hierarchy).__name__}')
  tokens = hierarchy.split()
  if not tokens:
    raise _invalid(hierarchy, 'it is empty')
  pairs = []
  for token in tokens:
    match = _LEVEL.match(token)
    if not match:
      raise _invalid(hierarchy, f"{token!r} is not of the form 'layers@factor'")
    pairs.append((int(match.group(1)), int(match.group(2))))
  if pairs != pairs[::-1]:
    raise _invalid(hierarchy, 'it is not a palindrome')
  if len(pairs) % 2 == 0:
    raise _invalid(hierarchy, 'it has no middle level')
  half = pairs[:len(pairs) // 2 + 1]  # Outermost to innermost.

  if half[0][1] == 1:  # The paper's notation: the @1 ends are full-length.
    n_vanilla, half = half[0][0], half[1:]
    # 'n@1' alone is a plain Transformer (trax would add vanilla_layers
    # around a level of factor 1).
    vanilla = (n_vanilla, n_vanilla) if half else (n_vanilla, 0)
    given = _check_vanilla_layers(vanilla_layers)
    if given not in ((1, 1), vanilla):
      example = (f"hierarchy='{' '.join(tokens[1:-1])}', vanilla_layers={given}"
                 if half else f"hierarchy='{n_vanilla + sum(given)}@1'")
      raise ValueError(
          f'hierarchy {hierarchy!r} names its full-length layers ({n_vanilla}@1) '
          f'and vanilla_layers={given} disagrees: give one of them, e.g. '
          f'{example}.')
  else:
    vanilla = _check_vanilla_layers(vanilla_layers)

  levels, outer = [], 1
  for n_layers, total in half:
    if total == 0:
      raise _invalid(hierarchy, 'a shorten factor is 0')
    if n_layers == 0:
      raise _invalid(hierarchy, f"'0@{total}' has no layers")
    if total <= outer or total % outer:
      raise _invalid(
          hierarchy, f'factor {total} is not a proper multiple of the factor '
          f'{outer} outside it')
    levels.append(Level(n_layers, total // outer, total))
    outer = total
  return Hierarchy(vanilla, tuple(levels))


def _check_vanilla_layers(vanilla_layers):
  try:
    pre, post = vanilla_layers
    ok = all(isinstance(n, int) and n >= 0 for n in (pre, post))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f'vanilla_layers={vanilla_layers!r} must be a pair of non-negative ints '
        '(full-length layers before, after the shortening), e.g. (2, 2).')
  return (pre, post)
