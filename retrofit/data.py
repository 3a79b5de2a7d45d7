"""Data for fine-tuning: a user's ``ImageFolder`` with timm's preprocessing, and the
offline digits set that the demo, the tests and ``retrofit gates --digits`` use.

Nothing here downloads anything. scikit-learn (for the digits) is imported only when the
digits are asked for; it comes with the ``train`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from .errors import OptionError

__all__ = ["DataSplits", "imagefolder_dataset", "imagefolder_datasets", "digits_datasets", "DIGITS_CLASSES"]

DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class DataSplits:
    """A train and a validation set with what a model needs to know about them."""

    train: Dataset  # yields (image tensor (C, H, W), class index)
    val: Dataset  # same, without augmentation
    classes: tuple[str, ...]  # class names, in label order
    input_size: tuple[int, int, int]  # (C, H, W) of the images the sets yield
    data_config: dict[str, Any]  # preprocessing used (timm's data config, or the digits' own)


def imagefolder_dataset(root: str | Path, model: nn.Module, *, train: bool = False) -> Dataset:
    """One ``torchvision.datasets.ImageFolder`` (``root/CLASS/*.jpg``) with timm's
    preprocessing for ``model``: the evaluation transform, or the training one if ``train``.

    Raises:
        OptionError: ``root`` is not a folder.
    """
    from timm.data import create_transform, resolve_data_config
    from torchvision.datasets import ImageFolder

    if not Path(root).is_dir():
        raise OptionError(f"{root} is not a folder; expected an ImageFolder layout, {root}/CLASS/*.jpg")
    config = resolve_data_config(model=model)
    return ImageFolder(str(root), transform=create_transform(**config, is_training=train))


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


class _RandomShift(Dataset):
    """Shift each image by up to ``pixels`` in x and y (zero fill), from torch's global RNG."""

    def __init__(self, base: TensorDataset, pixels: int) -> None:
        self.base, self.pixels = base, pixels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.base[i]
        p = self.pixels
        dx, dy = (int(v) for v in torch.randint(-p, p + 1, (2,)))
        padded = F.pad(x, (p, p, p, p))
        h, w = x.shape[-2:]
        return padded[:, p + dy : p + dy + h, p + dx : p + dx + w], y


def digits_datasets(
    size: int = 32,
    in_chans: int = 1,
    *,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    augment: bool = True,
    shift: int | None = None,
) -> DataSplits:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download),
    resized to ``size`` x ``size``.

    The split is stratified and fixed by ``split_seed`` (the same validation set for every
    training seed). Pixels go from 0..16 to [-1, 1]; with ``in_chans=3`` the gray image is
    repeated. Augmentation is a random shift of up to ``size // 16`` pixels.

    Args:
        size: output height and width (bilinear resize of the 8x8 scans).
        in_chans: 1 or 3 channels.
        val_fraction: share of the images held out for validation.
        split_seed: seed of the stratified split.
        augment: random shifts on the train split.
        shift: largest shift in pixels; default ``size // 16``.

    Raises:
        OptionError: ``in_chans`` is not 1 or 3, or ``size`` is below 8.
    """
    if in_chans not in (1, 3):
        raise OptionError(f"digits have 1 or 3 channels, not in_chans={in_chans}")
    if size < 8:
        raise OptionError(f"digits are 8x8 scans; size must be at least 8, not {size}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    if in_chans == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    idx_train, idx_val = train_test_split(
        range(len(labels)), test_size=val_fraction, stratify=digits.target, random_state=split_seed
    )
    train: Dataset = TensorDataset(images[idx_train], labels[idx_train])
    val = TensorDataset(images[idx_val], labels[idx_val])
    if augment:
        train = _RandomShift(train, size // 16 if shift is None else shift)
    config = {"input_size": (in_chans, size, size), "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans,
              "source": "sklearn.datasets.load_digits", "split_seed": split_seed, "val_fraction": val_fraction}
    return DataSplits(train, val, DIGITS_CLASSES, (in_chans, size, size), config)
