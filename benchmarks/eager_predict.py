"""Predict mode called token by token outside jit: ours next to trax's.

    python benchmarks/eager_predict.py --tokens 40

Calls each predict-mode model as trax's own tests do (`model(tok)` per token,
no jit): `HourglassLM` with fixed and whitespace boundaries, and trax's
`TransformerLM` of the same width and layer count. After `--warm` tokens
(jax compiles each operation once per shape), times `--tokens` more and counts
the XLA compilations among them (jax's compile event), which must be 0.
Prints a markdown table: seconds per token and the ratio to TransformerLM.
"""

import argparse
import time

import jax
import jax.monitoring
import numpy as np

_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_compilations = [0]


def _count(event, *unused_args, **unused_kwargs):
  if event == _COMPILE_EVENT:
    _compilations[0] += 1


def _models(d_model, vocab, max_len):
  """{name: predict-mode model}, each of 2 full-length layers."""
  import trax  # pylint: disable=g-import-not-at-top
  import trax_hourglass as th  # pylint: disable=g-import-not-at-top
  common = dict(d_model=d_model, d_ff=4 * d_model, n_heads=4, dropout=0.0,
                max_len=max_len, mode='predict')
  return {
      'TransformerLM (trax)': trax.models.TransformerLM(
          vocab, n_layers=2, **common),
      "HourglassLM '1@2' (fixed)": th.HourglassLM(
          vocab, vanilla_layers=(1, 1), hierarchy='1@2', **common),
      "HourglassLM '1@3' (whitespace)": th.HourglassLM(
          vocab, vanilla_layers=(1, 1), hierarchy='1@3',
          boundaries='whitespace', **common),
  }


def _run(model, warm, tokens, rng):
  from trax import shapes  # pylint: disable=g-import-not-at-top
  model.init(shapes.ShapeDtype((1, 1), np.int32))
  vocab = 256
  tok = np.zeros((1, 1), np.int32)
  for _ in range(warm):
    np.asarray(model(tok))
    tok = rng.integers(0, vocab, (1, 1)).astype(np.int32)
  before = _compilations[0]
  start = time.perf_counter()
  for _ in range(tokens):
    np.asarray(model(tok))
    tok = rng.integers(0, vocab, (1, 1)).astype(np.int32)
  return (time.perf_counter() - start) / tokens, _compilations[0] - before


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--d_model', type=int, default=32)
  parser.add_argument('--warm', type=int, default=12)
  parser.add_argument('--tokens', type=int, default=40)
  args = parser.parse_args(argv)
  if min(args.d_model, args.warm, args.tokens) < 1:
    parser.error('--d_model, --warm and --tokens must be >= 1')
  jax.monitoring.register_event_duration_secs_listener(_count)
  rng = np.random.default_rng(0)
  results = {name: _run(model, args.warm, args.tokens, rng) for name, model in
             _models(args.d_model, 256, args.warm + args.tokens).items()}
  base = results['TransformerLM (trax)'][0]
  print(f'jax {jax.__version__}, {jax.devices()[0].platform}; d_model '
        f'{args.d_model}; {args.tokens} tokens after {args.warm}\n')
  print('| model | s/token | x TransformerLM | compilations after warm-up |')
  print('|---|---|---|---|')
  for name, (per_token, compiled) in results.items():
    print(f'| {name} | {per_token:.4f} | {per_token / base:.1f} | '
          f'{compiled} |')


if __name__ == '__main__':
  main()
