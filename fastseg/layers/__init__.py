"""Drop-in ``nn.Module`` layers built on :mod:`fastseg.ops`."""
from .attention_gates import AttentionGate, CrossGate, GatedPointwise, SpatialGate, SqueezeExcite
from .batch_norm_act import BatchNormAct2d
from .dilated_attention import GlobalSelfAttention2d, SparseTransformer2d
from .dynamic_conv import DynamicConv2d
from .mixed_depthwise_conv import DepthwiseConv2d, MixedDepthwiseConv2d
from .pointwise_conv import PointwiseConv2d
from .pooling import MaxPool2x2

__all__ = ["AttentionGate", "BatchNormAct2d", "CrossGate", "DepthwiseConv2d", "DynamicConv2d", "GatedPointwise",
           "GlobalSelfAttention2d", "MaxPool2x2", "MixedDepthwiseConv2d", "PointwiseConv2d", "SparseTransformer2d",
           "SpatialGate", "SqueezeExcite"]
