"""Training and evaluation machinery, independent of any model: ``losses`` (segmentation losses on
logits) and ``metrics`` (Dice, IoU, HD95, ASSD with MONAI's conventions). Submodules load on use;
this package imports none of them, nor ``fastseg.data`` or ``fastseg.models``."""
