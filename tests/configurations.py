"""Resampling and attention choices that the property tests draw from."""

import functools

import trax.layers as tl
from trax.layers.research import sparsity

import trax_hourglass as th

L = th.layers
# name: (downsampling_fn, attention_downsampling_fn)
SHORTENING = {
    'attention(average)': (L.AttentionResampling, L.AveragePooling),
    'attention(linear)': (L.AttentionResampling, L.LinearPooling),
    'average': (L.AveragePooling, L.AveragePooling),
    'linear': (L.LinearPooling, L.AveragePooling),
}
# name: (upsampling_fn, attention_upsampling_fn)
UPSAMPLING = {
    'attention(linear)': (L.AttentionResampling, L.LinearUpsampling),
    'attention(repeat)': (L.AttentionResampling, L.NaiveUpsampling),
    'repeat': (L.NaiveUpsampling, L.LinearUpsampling),
    'linear': (L.LinearUpsampling, L.LinearUpsampling),
}
ATTENTION = {  # LSH aside: chunked LSH is not prefix-invariant.
    'relative': L.RelativeAttentionWrapper,
    'rotary': L.RotaryCausalAttention,
    'softmax': tl.CausalAttention,
    'performer': tl.CausalFavor,
    'sparse_qkv': functools.partial(
        sparsity.MultiplicativeConvCausalAttention, sparsity=2),
}
