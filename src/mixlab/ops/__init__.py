"""Operations shared by several model families."""
from .axial_shift import axial_shift
from .depthwise import DepthwiseConv2d, depthwise_conv2d, restore_depthwise, use_fast_depthwise

__all__ = ["axial_shift", "depthwise_conv2d", "DepthwiseConv2d", "use_fast_depthwise", "restore_depthwise"]
