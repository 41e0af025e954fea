"""Functional API of fastseg's fused ops. One module per op family; each holds the reference
implementation (the semantics), the custom-op registration and the backend dispatch."""
from .attention_gates import (attention_gate, attention_gate_reference, channel_gate,
                              channel_gate_reference, cross_gate, cross_gate_reference,
                              gated_pointwise, gated_pointwise_reference, spatial_gate,
                              spatial_gate_reference)
from .norm_act import batch_norm_act, batch_norm_act_reference
from .dilated_attention import dilated_attention2d, dilated_attention2d_reference
from .dynamic_conv import dynamic_conv2d, dynamic_conv2d_reference
from .mixed_depthwise_conv import mixed_depthwise_conv2d, mixed_depthwise_conv2d_reference
from .pointwise import pointwise_conv2d, pointwise_conv2d_reference
from .pool import max_pool2x2, max_pool2x2_reference

__all__ = ["attention_gate", "attention_gate_reference", "batch_norm_act", "batch_norm_act_reference",
           "channel_gate", "channel_gate_reference",
           "cross_gate", "cross_gate_reference", "dilated_attention2d",
           "dilated_attention2d_reference", "dynamic_conv2d", "dynamic_conv2d_reference",
           "gated_pointwise", "gated_pointwise_reference", "max_pool2x2", "max_pool2x2_reference",
           "mixed_depthwise_conv2d",
           "mixed_depthwise_conv2d_reference", "pointwise_conv2d", "pointwise_conv2d_reference",
           "spatial_gate", "spatial_gate_reference"]
