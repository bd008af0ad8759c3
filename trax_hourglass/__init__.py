"""trax_hourglass: Hourglass, the hierarchical Transformer LM, for Trax.

Importing this package applies `compat` (fixes for trax 1.4.1 on the pinned stack)
before anything else imports trax, and registers every configurable with gin under
the module `trax_hourglass`.
"""

import os

import gin

from trax_hourglass import compat

compat.apply()

# The repository's variant configs include their base by its path in the
# repository (`include 'gin/enwik8_hourglass.gin'`), and gin resolves an
# include against the working directory, then its search path.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO, 'gin')):
  gin.add_config_file_search_path(_REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from trax_hourglass.hierarchy import Hierarchy
from trax_hourglass.hierarchy import parse_hierarchy
from trax_hourglass import layers
from trax_hourglass.models.hourglass import HourglassLM
from trax_hourglass.attention_maps import attention_maps
from trax_hourglass.segments import segment_boundaries
from trax_hourglass.checkpoints import load_trax_hourglass_weights
from trax_hourglass import data
from trax_hourglass import runs
from trax_hourglass.loop import Loop
from trax_hourglass.training import train

__version__ = '0.1.0'
