"""The hierarchy parser: both notations, and clear errors for malformed strings."""

import pytest

from trax_hourglass.hierarchy import Level, parse_hierarchy


def test_trax_notation():
  h = parse_hierarchy('8@3', vanilla_layers=(2, 2))
  assert h.vanilla_layers == (2, 2)
  assert h.levels == (Level(8, 3, 3),)
  assert h.total_factor == 3


def test_paper_notation_equals_trax_notation():
  assert parse_hierarchy('2@1 8@3 2@1') == parse_hierarchy('8@3', (2, 2))


def test_nested_levels_use_relative_factors():
  h = parse_hierarchy('1@2 2@6 1@2')
  assert h.shorten_factors == (2, 3)
  assert [lv.total_factor for lv in h.levels] == [2, 6]
  assert h.total_factor == 6


def test_plain_transformer():
  h = parse_hierarchy('12@1')
  assert h.levels == () and h.vanilla_layers == (12, 0) and h.total_factor == 1
  assert parse_hierarchy('12@1', vanilla_layers=(12, 0)) == h


def test_plain_transformer_refuses_vanilla_layers():
  """trax's HourglassLM would put them around a factor-1 level: ambiguous."""
  with pytest.raises(ValueError,
                     match=r"vanilla_layers=\(2, 2\) .* hierarchy='16@1'"):
    parse_hierarchy('12@1', vanilla_layers=(2, 2))


@pytest.mark.parametrize('bad, why', [
    ('8@', "'8@' is not of the form"),
    ('abc', "'abc' is not of the form"),
    ('', 'it is empty'),
    ('1@2 2@6 1@3', 'it is not a palindrome'),
    ('1@2 1@2', 'it has no middle level'),
    ('1@4 1@6 1@4', 'factor 6 is not a proper multiple of the factor 4'),
    ('1@3 1@3 1@3', 'factor 3 is not a proper multiple of the factor 3'),
    ('8@0', 'a shorten factor is 0'),
    ('0@3', "'0@3' has no layers"),
    ('8@-3', "'8@-3' is not of the form"),
])
def test_malformed_hierarchy_names_the_string_and_a_valid_one(bad, why):
  with pytest.raises(ValueError) as e:
    parse_hierarchy(bad)
  message = str(e.value)
  # The reason comes first: the rest of the message is the same for all.
  assert message.startswith(f'Invalid hierarchy {bad!r}: {why}'), message
  assert "'2@1 8@3 2@1'" in message  # Says what a valid one looks like.


def test_paper_notation_conflicting_vanilla_layers():
  with pytest.raises(ValueError, match=r"vanilla_layers=\(3, 3\)"):
    parse_hierarchy('2@1 8@3 2@1', vanilla_layers=(3, 3))


@pytest.mark.parametrize('bad', [(1,), (-1, 1), 'ab', None, (1.5, 1)])
def test_bad_vanilla_layers(bad):
  with pytest.raises(ValueError, match='vanilla_layers'):
    parse_hierarchy('8@3', vanilla_layers=bad)
