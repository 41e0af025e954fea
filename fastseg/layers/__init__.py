"""Drop-in ``nn.Module`` layers built on :mod:`fastseg.ops`."""
from .dilated_attention import GlobalSelfAttention2d, SparseTransformer2d
from .dynamic_conv import DynamicConv2d
from .mixed_depthwise_conv import MixedDepthwiseConv2d

__all__ = ["DynamicConv2d", "GlobalSelfAttention2d", "MixedDepthwiseConv2d", "SparseTransformer2d"]
