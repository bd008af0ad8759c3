"""Reports: markdown tables, JSON files and matplotlib plots (PNG)."""

import json
import os
import traceback


def fmt(x, spec=',.0f', missing='n/a', suffix=''):
  return missing if x is None else format(x, spec) + suffix


def markdown_table(headers, rows, align=None):
  """Returns a GitHub-markdown table; `align` is a string of 'l'/'r' per column."""
  align = align or 'l' + 'r' * (len(headers) - 1)
  rule = ['---:' if a == 'r' else ':---' for a in align]
  lines = [headers, rule] + [[str(c) for c in row] for row in rows]
  return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines)


def write_json(path, **report):
  """Writes `report` as indented JSON with sorted keys."""
  with open(path, 'w') as f:
    json.dump(report, f, indent=2, sort_keys=True)


def pyplot():
  """matplotlib.pyplot drawing to files (Agg), or None if not installed."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return plt


def plot_path(args):
  """--plot, else the --json path with .png, else None (no plot)."""
  return args.plot or (os.path.splitext(args.json)[0] + '.png'
                       if args.json else None)


def length_axis(ax, lengths, label):
  """Log2 x axis ticked at the sequence `lengths`, labelled `label`."""
  ax.set_xscale('log', base=2)
  ax.set_xticks(list(lengths))
  ax.set_xticklabels([f'{n:,}' for n in lengths], fontsize=8)
  ax.xaxis.set_minor_locator(pyplot().NullLocator())
  ax.set_xlabel(label)


def save_figure(fig, path):
  """Grids and legends every plot of `fig`, writes it to `path`, frees it."""
  for ax in fig.axes:
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  pyplot().close(fig)
  return True  # For `write_plot`: plotted.


def write_plot(plot, path):
  """Calls `plot(path)` (False: no matplotlib); prints where it went or why not.

  Never raises: a plot must not lose the measurements (or the JSON after it).
  """
  try:
    plotted = plot(path)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    plotted = f'failed, {type(e).__name__}: {e}'
  print(f'\nPlot: {path}' if plotted is True else
        f'\nNo plot: {plotted or "matplotlib is not installed"}.')
