"""Layers of the hourglass: resampling, attention and sparse layers."""

from trax_hourglass.layers.attention import causal_mask
from trax_hourglass.layers.attention import RelativeAttention
from trax_hourglass.layers.attention import RelativeAttentionBiases
from trax_hourglass.layers.attention import RelativeAttentionWrapper
from trax_hourglass.layers.attention import RelativeDotProductAttention
from trax_hourglass.layers.attention_types import SelfAttention
from trax_hourglass.layers.boundaries import boundary_metrics
from trax_hourglass.layers.boundaries import LossWithBoundaries
from trax_hourglass.layers.cache import PastMaxLenError
from trax_hourglass.layers.resampling import AttentionResampling
from trax_hourglass.layers.resampling import AveragePooling
from trax_hourglass.layers.feed_forward import FeedForwardResidual
from trax_hourglass.layers.dense import Dense
from trax_hourglass.layers.dropout import Dropout
from trax_hourglass.layers.resampling import LinearPooling
from trax_hourglass.layers.resampling import LinearUpsampling
from trax_hourglass.layers.resampling import NaiveUpsampling
from trax_hourglass.layers.rotary import RotaryCausalAttention
from trax_hourglass.layers.sparse import FeedForwardBlock
from trax_hourglass.layers.sparse import VocabProjection
