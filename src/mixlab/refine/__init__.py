"""Boundary patch refinement (BPR, Tang et al., CVPR 2021): refine a coarse mask's boundary
with a small network that sees image and mask patches cut along it.

* :mod:`~mixlab.refine.patches`: boundary pixels, boxes, NMS, crop and paste (batched);
* :mod:`~mixlab.refine.refiner`: refine whole masks; cut training patches;
* :mod:`~mixlab.refine.metrics`: IoU/Dice before and after, boundary F-score;
* :mod:`~mixlab.refine.coarse`: coarse masks from folders, seg runs, out-of-fold training;
* :mod:`~mixlab.refine.use`: evaluate and apply a trained refiner;
* :mod:`~mixlab.refine.figures`: pictures.

Training is the ``refine`` task (:mod:`mixlab.tasks.refine`), run by `mixlab refine train`.
"""
from .metrics import boundary_scores, compare_refinement  # noqa: F401
from .patches import (boundary_boxes, boundary_map, crop_patches, paste_patches, reassemble,  # noqa: F401
                      refiner_input)
from .refiner import PatchSettings, refine_masks, training_patches  # noqa: F401
