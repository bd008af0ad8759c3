"""Where data files live: the data dir, and TFDS splits read from it.

Loaders given no `data_dir` use the trainer's --data_dir
(`set_default_data_dir`), else $TRAX_HOURGLASS_DATA_DIR, else
~/tensorflow_datasets (where TFDS keeps its data too).
"""

import os

_DEFAULT_DATA_DIR = None


def set_default_data_dir(data_dir):
  """Sets the data dir used when a loader is given none (the trainer's flag)."""
  global _DEFAULT_DATA_DIR
  _DEFAULT_DATA_DIR = data_dir


def default_data_dir(data_dir=None):
  """`data_dir`, else the trainer's --data_dir, else $TRAX_HOURGLASS_DATA_DIR,
  else ~/tensorflow_datasets (where TFDS keeps data too)."""
  return os.path.expanduser(
      data_dir or _DEFAULT_DATA_DIR or os.environ.get('TRAX_HOURGLASS_DATA_DIR')
      or os.path.join('~', 'tensorflow_datasets'))


def tfds_examples(name, split, data_dir, download):
  """The examples of a TFDS split as numpy, or a clear error saying how to get it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir, download=download,
                   shuffle_files=False)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'TFDS dataset {name!r} (split {split!r}) is not available in '
        f'{data_dir} ({type(e).__name__}: {e}). Prepare it there with '
        f'`tfds build {name} --data_dir={data_dir}` on a machine with '
        'network access, or pass --data_dir where it is prepared.') from e
  return tfds.as_numpy(ds)
