"""Binary and multi-label medical image segmentation: data, losses, metrics, predictions.

The model side lives in :mod:`mixlab.models.unext`; training reuses the classification
machinery of :mod:`mixlab.train`.
"""
from .data import (  # noqa: F401
    JointAugment, SegDataset, load_segmentation_data, normalize_images, read_image_mask_dirs,
    read_split_file, read_unext_folder, split_dataset, split_names, write_split_file,
)
from .losses import LOSSES, BCEDiceLoss, BCELoss, DiceLoss, FocalLoss, build_loss  # noqa: F401
from .metrics import (  # noqa: F401
    SegMetrics, confusion_counts, official_iou_dice, official_iou_score, scores_from_counts,
)
from .predict import overlay_panel, predict_images, save_mask_png, write_predictions  # noqa: F401
