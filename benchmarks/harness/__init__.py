"""The plumbing every benchmark script shares; the scripts hold their suites.

A benchmark script is both a parent and a worker. The parent never imports
trax: it spawns a fresh Python process per measurement (so JAX compilation
caches, allocator state and trax's global state never leak from one model into
another), reads the one result line the worker prints, and reports. With the
hidden `--_worker NAME --_config JSON` flags the script runs one measurement.

  workers    spawning a worker (timeout, memory limit), its result line, body
  memory     resident memory of a process, polled by `run_worker`
  timing     rounds, medians and ratios; what the clocks count in a worker
  models     the compared models (`make_model`), random batches, FLOP counts
  cli        the shared flags, config from flags, a script's `main`
  report     markdown tables, JSON, plots
  training   a model's timed training steps (train_speed's workers)
  profiling  device operations of a traced call (jax.profiler), per token

As trax's `tl`, the package re-exports its modules' names: a script writes
`harness.measure(...)`, `harness.markdown_table(...)`.
"""

import sys

from harness.cli import add_config_flags
from harness.cli import benchmark_parser
from harness.cli import config_from_args
from harness.cli import main
from harness.cli import parse_int_tuple
from harness.cli import parse_names
from harness.cli import QUICK_NOTE
from harness.memory import proc_rss_mib
from harness.memory import self_peak_rss_mib
from harness.models import ABLATION_MODELS
from harness.models import ALL_MODELS
from harness.models import BASELINES
from harness.models import check_lengths
from harness.models import count_params
from harness.models import make_model
from harness.models import max_shorten_factor
from harness.models import never
from harness.models import parse_hierarchy
from harness.models import random_lm_batches
from harness.models import train_step_flops
from harness.profiling import per_unit
from harness.profiling import per_unit_table
from harness.report import fmt
from harness.report import length_axis
from harness.report import markdown_table
from harness.report import plot_path
from harness.report import pyplot
from harness.report import save_figure
from harness.report import write_json
from harness.report import write_plot
from harness.timing import add_ratios
from harness.timing import block
from harness.timing import matmul_peak
from harness.timing import matmul_peak_worker
from harness.timing import median
from harness.timing import one_xla_thread
from harness.timing import run_rounds
from harness.timing import run_steps
from harness.timing import split_stopped
from harness.timing import spread
from harness.timing import xla_threads
from harness.training import train_throughput
from harness.workers import device_summary
from harness.workers import emit_result
from harness.workers import import_trax
from harness.workers import log
from harness.workers import measure
from harness.workers import parse_result
from harness.workers import record_line
from harness.workers import REPO_ROOT
from harness.workers import RESULT_PREFIX
from harness.workers import run_worker
from harness.workers import SEED
from harness.workers import worker_env
from harness.workers import work
from harness.workers import worker_failure_status

# Workers import the working tree's `trax_hourglass`, installed or not.
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
