"""Operations shared by several model families."""
from .axial_shift import axial_shift

__all__ = ["axial_shift"]
