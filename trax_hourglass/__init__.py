"""trax_hourglass: Hourglass, the hierarchical Transformer LM, for Trax.

Importing this package imports trax with the jax shims a model needs
(`compat.apply_jax_shims`) before anything else imports it, and registers every
configurable with gin under the module `trax_hourglass`. trax's training
machinery stays as trax ships it until training installs its fixes
(`install_training_fixes`, which `train` and `Loop` call).
"""

import os

import gin

from trax_hourglass import compat

compat.apply_jax_shims()

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
from trax_hourglass.trax_fixes import install_training_fixes

__version__ = '0.1.0'
