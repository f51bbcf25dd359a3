"""Operations shared by several model families."""
from .axial_shift import axial_shift
from .bn_relu import BatchNormReLU2d, restore_bn_relu, use_fast_bn_relu
from .dense_conv import DenseConv2d, dense_conv_weight_grad, restore_dense_conv, use_fast_dense_conv
from .depthwise import DepthwiseConv2d, depthwise_conv2d, restore_depthwise, use_fast_depthwise
from .gelu import FastGELU, GeluBatchNorm2d, gelu_batch_norm, restore_gelu, use_fast_gelu
from .layernorm import FastLayerNorm, FastLayerNorm2d, restore_layernorm, use_fast_layernorm
from .pointwise import PointwiseConv2d, pointwise_weight_grad, restore_pointwise, use_fast_pointwise
from .resample import PoolingBatchNorm2d, UpsamplingBatchNorm2d, UpsamplingConv2d, restore_resample, use_fast_resample
from .residual import FusedResidual
from .seg_loss import bce_dice

# (the GELU function itself is mixlab.ops.gelu.gelu: `mixlab.ops.gelu` stays the module)
__all__ = ["axial_shift", "depthwise_conv2d", "DepthwiseConv2d", "use_fast_depthwise", "restore_depthwise",
           "gelu_batch_norm", "FastGELU", "GeluBatchNorm2d", "use_fast_gelu", "restore_gelu", "FusedResidual",
           "FastLayerNorm", "FastLayerNorm2d", "use_fast_layernorm", "restore_layernorm",
           "PointwiseConv2d", "use_fast_pointwise", "restore_pointwise", "pointwise_weight_grad", "bce_dice",
           "DenseConv2d", "use_fast_dense_conv", "restore_dense_conv", "dense_conv_weight_grad",
           "PoolingBatchNorm2d", "UpsamplingBatchNorm2d", "UpsamplingConv2d", "use_fast_resample", "restore_resample",
           "BatchNormReLU2d", "use_fast_bn_relu", "restore_bn_relu"]
