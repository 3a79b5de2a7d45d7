"""Data for fine-tuning, scoring and gate plots: a user's ``ImageFolder`` with the
preprocessing the model's weights expect (timm's data config).

Nothing here downloads anything. The example experiments' data sets (scikit-learn's digits,
Fashion-MNIST) live beside them, in ``examples/example_data.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import Dataset

from .errors import DataError, OptionError

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

__all__ = ["DataSplits", "imagefolder_dataset", "imagefolder_datasets"]


@dataclass(frozen=True)
class DataSplits:
    """A train and a validation set with what a model needs to know about them."""

    train: Dataset  # yields (image tensor (C, H, W), class index)
    val: Dataset  # same, without augmentation
    classes: tuple[str, ...]  # class names, in label order
    input_size: tuple[int, int, int]  # (C, H, W) of the images the sets yield
    data_config: dict[str, Any]  # preprocessing used (timm's data config, or the data set's own)
    test: Dataset | None = None  # a held-out test split, where the data set has one


def imagefolder_dataset(root: str | Path, model: nn.Module, *, train: bool = False) -> ImageFolder:
    """One ``torchvision.datasets.ImageFolder`` (``root/CLASS/*.jpg``) with timm's
    preprocessing for ``model``: the evaluation transform, or the training one if ``train``.

    Raises:
        OptionError: ``root`` is not a folder.
        DataError: it holds no class folders with images.
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise OptionError(f"{root} is not a folder; expected an ImageFolder layout, {root}/CLASS/*.jpg")
    config = resolve_data_config(model=model)
    try:
        return ImageFolder(str(root), transform=create_transform(**config, is_training=train))
    except FileNotFoundError as e:  # no class folders, or class folders without images
        raise DataError(f"{root} is not an ImageFolder: {e}; expected {root}/CLASS/*.jpg "
                        "(one sub-folder per class, holding images)") from None


def imagefolder_datasets(
    root: str | Path,
    model: nn.Module,
    *,
    train_dir: str = "train",
    val_dir: str = "val",
    augment: bool = True,
) -> DataSplits:
    """``root/train`` and ``root/val`` as ``torchvision.datasets.ImageFolder`` sets,
    preprocessed the way the model's weights expect.

    The preprocessing is timm's: ``resolve_data_config(model=model)`` reads the model's
    ``pretrained_cfg`` (kept on a retrofitted GraphModule), and ``create_transform`` builds
    the training (random-resized crop, flip) and evaluation (resize, center crop) pipelines.

    Args:
        root: a folder with one sub-folder per split, each with one sub-folder per class.
        model: the model to train (a retrofitted GraphModule or any timm model).
        train_dir: name of the training split's folder.
        val_dir: name of the validation split's folder.
        augment: timm's training augmentation on the train split; else the eval transform.

    Returns:
        The two sets; both have the same classes.

    Raises:
        OptionError: a split folder is missing, or the two splits have different classes.

    Example:
        >>> data = imagefolder_datasets("flowers/", gm)
        >>> len(data.classes), data.input_size
    """
    from timm.data import resolve_data_config

    root = Path(root)
    for split in (train_dir, val_dir):
        if not (root / split).is_dir():
            raise OptionError(
                f"{root / split} is not a folder; --data expects {root}/{train_dir}/CLASS/*.jpg "
                f"and {root}/{val_dir}/CLASS/*.jpg (torchvision ImageFolder layout)"
            )
    train = imagefolder_dataset(root / train_dir, model, train=augment)
    val = imagefolder_dataset(root / val_dir, model)
    if train.classes != val.classes:
        raise OptionError(
            f"{root / train_dir} and {root / val_dir} have different classes "
            f"({len(train.classes)} vs {len(val.classes)}); both splits need the same class folders"
        )
    config = resolve_data_config(model=model)
    return DataSplits(train, val, tuple(train.classes), tuple(config["input_size"]), dict(config))
