"""The example experiments' data sets: scikit-learn's bundled handwritten digits (the digits
demo, ``examples/finetune.py --digits``, the tests) and Fashion-MNIST read from its IDX files
(Debian's ``dataset-fashion-mnist`` package, or any folder; the Fashion-MNIST, placement and
YOLO experiments).

Not part of the ``retrofit`` package: a user's own data is an ImageFolder
(``retrofit.data.imagefolder_datasets``). The scripts here import this module by name, as
``python examples/NAME.py`` puts ``examples/`` first on ``sys.path``.

Nothing here downloads anything. scikit-learn (for the digits) is imported only when the
digits are asked for; it comes with the ``train`` extra. The splits are fixed by their seeds:
the committed results under ``docs/`` depend on them, so change none of it lightly.
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from retrofit.data import DataSplits
from retrofit.errors import DataError, OptionError

__all__ = [
    "digits_datasets",
    "DIGITS_CLASSES",
    "read_idx",
    "load_fashion_mnist",
    "fashion_mnist_datasets",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "RandomShift",
]

DIGITS_CLASSES: tuple[str, ...] = tuple(str(i) for i in range(10))


class RandomShift(Dataset):
    """Shift each image by up to ``pixels`` in x and y (filled with ``fill``), and mirror it
    left-right with probability 0.5 if ``flip``; from torch's global RNG."""

    def __init__(self, base: Dataset, pixels: int, flip: bool = False, fill: float = 0.0) -> None:
        self.base, self.pixels, self.flip, self.fill = base, pixels, flip, fill

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.base[i]
        p = self.pixels
        dx, dy = (int(v) for v in torch.randint(-p, p + 1, (2,)))
        padded = F.pad(x, (p, p, p, p), value=self.fill)
        h, w = x.shape[-2:]
        x = padded[:, p + dy : p + dy + h, p + dx : p + dx + w]
        if self.flip and int(torch.randint(2, ())):
            x = x.flip(-1)
        return x, y


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
        train = RandomShift(train, size // 16 if shift is None else shift)
    config = {"input_size": (in_chans, size, size), "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans,
              "source": "sklearn.datasets.load_digits", "split_seed": split_seed, "val_fraction": val_fraction}
    return DataSplits(train, val, DIGITS_CLASSES, (in_chans, size, size), config)


FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Mean and std of the 60,000 training images' pixels in [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FASHION_INSTALL = "apt-get update && apt-get install -y dataset-fashion-mnist"
# IDX type codes (the third byte of the magic number) and the big-endian dtypes they hold.
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file (the MNIST format: a magic number, the dimensions, then the data),
    gzipped or not, as a tensor of its own dtype and shape.

    Raises:
        DataError: the file is missing, truncated, or not an IDX file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read IDX file {str(path)!r}: {getattr(e, 'strerror', None) or e}") from e
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_TYPES:
        raise DataError(f"{str(path)!r} is not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"{str(path)!r} is truncated: its header names {ndim} dimensions")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    size = math.prod(shape) * dtype.itemsize
    if len(raw) - head != size:
        raise DataError(f"{str(path)!r} holds {len(raw) - head} data bytes; its header {shape} needs {size}")
    data = np.frombuffer(raw, dtype=dtype, offset=head).astype(dtype.newbyteorder("="))
    return torch.from_numpy(data.reshape(shape))


def _idx_file(root: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` in ``root`` or in torchvision's download layout under it."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_fashion_mnist(root: str | Path | None = None, split: str = "train") -> tuple[Tensor, Tensor]:
    """The images (N, 28, 28) as uint8 and the labels (N,) as int64 of one Fashion-MNIST split.

    Args:
        root: the folder with the four IDX files (gzipped or not); default Debian's
            ``/usr/share/datasets/fashion-mnist``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Raises:
        DataError: the files are missing (the message gives the install command) or malformed.
        OptionError: ``split`` is not train or test.
    """
    if split not in _FASHION_FILES:
        raise OptionError(f"Fashion-MNIST split {split!r} is not valid (valid: {', '.join(_FASHION_FILES)})")
    folder = FASHION_MNIST_ROOT if root is None else Path(root)
    files = [_idx_file(folder, stem) for stem in _FASHION_FILES[split]]
    if None in files:
        missing = _FASHION_FILES[split][files.index(None)]
        raise DataError(
            f"Fashion-MNIST not found: no {missing}[.gz] in {str(folder)!r}; install it with "
            f"`{_FASHION_INSTALL}` (as root) or pass the folder that holds the IDX files (--data-root DIR)"
        )
    images, labels = (read_idx(f) for f in files)  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{str(files[0])!r} and {str(files[1])!r} do not pair up: images {list(images.shape)}, "
                        f"labels {list(labels.shape)}")
    return images, labels.long()


def _stratified(labels: Tensor, fraction: float, generator: torch.Generator) -> Tensor:
    """Indices of a random ``fraction`` of each class, in ascending order."""
    keep = []
    for k in labels.unique():
        idx = (labels == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        keep.append(idx[: max(1, round(fraction * len(idx)))])
    return torch.cat(keep).sort().values


def fashion_mnist_datasets(
    root: str | Path | None = None,
    *,
    val_size: int = 6000,
    split_seed: int = 0,
    train_fraction: float = 1.0,
    augment: bool = True,
    shift: int = 2,
    flip: bool = True,
) -> DataSplits:
    """Fashion-MNIST (Xiao, Rasul, Vollgraf, arXiv:1708.07747): 28x28 grey images of 10
    kinds of clothing, 60,000 for training and 10,000 for testing.

    A validation split of ``val_size`` images, stratified and fixed by ``split_seed``, is
    carved from the training images (choose settings on it, never on the test split); the
    test split is ``DataSplits.test``. Pixels are normalised with the training set's mean
    and std. Augmentation (train split only) is a random shift of up to ``shift`` pixels
    and a left-right flip.

    Args:
        root: folder of the IDX files; default Debian's ``/usr/share/datasets/fashion-mnist``.
        val_size: images held out from the training images (0: none, and ``val`` is empty).
        split_seed: seed of the validation split and of the ``train_fraction`` subset.
        train_fraction: keep this stratified fraction of the remaining training images
            (a low-data run); the validation and test splits are not reduced.
        augment: random shifts (and flips) on the train split.
        shift: largest shift in pixels.
        flip: mirror left-right with probability 0.5.

    Raises:
        DataError: the files are missing (the message gives the install command) or malformed.
        OptionError: ``val_size`` or ``train_fraction`` is out of range.

    Example:
        >>> data = fashion_mnist_datasets(val_size=6000)
        >>> len(data.train), len(data.val), len(data.test)
        (54000, 6000, 10000)
    """
    if not 0 < train_fraction <= 1:
        raise OptionError(f"train_fraction must be in (0, 1], not {train_fraction}")
    images, labels = load_fashion_mnist(root, "train")
    test_images, test_labels = load_fashion_mnist(root, "test")
    if not 0 <= val_size < len(labels):
        raise OptionError(f"val_size must be in 0..{len(labels) - 1}, not {val_size}")

    def normalise(x: Tensor) -> Tensor:
        return ((x.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)

    gen = torch.Generator().manual_seed(split_seed)
    is_val = torch.zeros(len(labels), dtype=torch.bool)
    if val_size:
        is_val[_stratified(labels, val_size / len(labels), gen)] = True
    train_idx = (~is_val).nonzero().flatten()
    if train_fraction < 1:
        train_idx = train_idx[_stratified(labels[train_idx], train_fraction, gen)]
    x = normalise(images)
    train: Dataset = TensorDataset(x[train_idx], labels[train_idx])
    if augment:
        train = RandomShift(train, shift, flip, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    val = TensorDataset(x[is_val], labels[is_val])
    test = TensorDataset(normalise(test_images), test_labels)
    config = {"input_size": (1, 28, 28), "mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,),
              "source": str(FASHION_MNIST_ROOT if root is None else root), "split_seed": split_seed,
              "val_size": int(is_val.sum()), "train_fraction": train_fraction}
    return DataSplits(train, val, FASHION_MNIST_CLASSES, (1, 28, 28), config, test)
