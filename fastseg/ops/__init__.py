"""Functional API of fastseg's fused ops. One module per op family; each holds the reference
implementation (the semantics), the custom-op registration and the backend dispatch."""
from .dilated_attention import dilated_attention2d, dilated_attention2d_reference
from .dynamic_conv import dynamic_conv2d, dynamic_conv2d_reference
from .mixed_depthwise_conv import mixed_depthwise_conv2d, mixed_depthwise_conv2d_reference

__all__ = ["dilated_attention2d", "dilated_attention2d_reference", "dynamic_conv2d", "dynamic_conv2d_reference", "mixed_depthwise_conv2d",
           "mixed_depthwise_conv2d_reference"]
