"""Weight initialisation that the official codes of several families share."""
from torch import nn
from timm.layers import trunc_normal_


def init_trunc_normal_(layer: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights (timm's ``trunc_normal_``: std 0.02, cut at +-2) and zero biases."""
    trunc_normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
