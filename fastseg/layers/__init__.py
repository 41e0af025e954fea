"""Drop-in ``nn.Module`` layers built on :mod:`fastseg.ops`."""
from .mixed_depthwise_conv import MixedDepthwiseConv2d

__all__ = ["MixedDepthwiseConv2d"]
