"""Data for Hourglass experiments: resumable, gin-configurable trax `Inputs`.

Every loader returns a `trax.data.inputs.Inputs` whose streams yield
`(inputs, targets, weights)` batches (inputs == targets: LMs shift right
themselves) and resume at the saved data position (see `streams`). Bind one as
`train.inputs = @trax_hourglass.enwik8_inputs` in gin. In multi-host training
batch sizes are per process and each process reads its own slice of every
global batch (`streams.process_shard`).
"""

from trax_hourglass.data import images
from trax_hourglass.data import streams
from trax_hourglass.data import text
from trax_hourglass.data import wiki40b
from trax_hourglass.data.images import flatten_images
from trax_hourglass.data.images import npz_image_inputs
from trax_hourglass.data.images import tfds_image_inputs
from trax_hourglass.data.locations import set_default_data_dir
from trax_hourglass.data.streams import restartable_stream
from trax_hourglass.data.streams import ResumableInputs
from trax_hourglass.data.streams import resumable_stream
from trax_hourglass.data.text import byte_file_inputs
from trax_hourglass.data.text import enwik8_inputs
from trax_hourglass.data.text import enwik8_path
from trax_hourglass.data.text import stdlib_text_inputs
from trax_hourglass.data.wiki40b import sentencepiece_lm_inputs
from trax_hourglass.data.wiki40b import wiki40b_inputs
