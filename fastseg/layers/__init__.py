"""Drop-in ``nn.Module`` layers built on :mod:`fastseg.ops`."""
from .dynamic_conv import DynamicConv2d
from .mixed_depthwise_conv import MixedDepthwiseConv2d

__all__ = ["DynamicConv2d", "MixedDepthwiseConv2d"]
