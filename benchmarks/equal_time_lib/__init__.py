"""What equal_time.py runs its suites with; the script holds the suites.

  variants    the variants: names, hierarchies, legends (`describe`)
  models      a variant's model (`model_fn`), built in its worker
  data        a byte file's splits or an .npz of images, as batches
  train       the worker: trains a variant for its budget, scores it
  completion  the images suite's completion grid
  config      the command line and the config it resolves to
  report      the tables, legend, plot and JSON
  run         the parent (runs the variants) and the worker's entry
"""
