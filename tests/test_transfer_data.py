"""The transfer split (examples/transfer_data.py): no class of one task in the other's sets,
fixed and nested sizes, and canvases that the same seed makes again byte for byte.

The IDX files are written here (CI has no Debian package), with images whose pixels tell
their class, so that the test reads each item's class back from the image itself."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from transfer_data import SOURCE_CLASSES, TARGET_CLASSES, first_canvases, task_canvases, task_datasets

from retrofit.errors import OptionError

from .test_fashion_mnist import make_fashion, write_idx


def _class_of_rows(images: torch.Tensor) -> list[int]:
    """make_fashion's images: the brightest row is 2 + 2 * class."""
    return ((images.squeeze(1).mean(2).argmax(1) - 2) // 2).tolist()


def test_the_classification_split_keeps_the_tasks_apart(tmp_path: Path) -> None:
    root = make_fashion(tmp_path / "fm", n_train=400, n_test=100)  # 40 training images per class
    source = task_datasets("source", per_class=10, val_per_class=5, root=root, augment=False)
    target = task_datasets("target", per_class=10, val_per_class=5, root=root, augment=False)
    for data, classes in ((source, SOURCE_CLASSES), (target, TARGET_CLASSES)):
        for split in (data.train, data.val, data.test):
            x, y = split.tensors
            seen = _class_of_rows(x)
            assert set(seen) <= set(classes)  # only the task's own classes
            assert [classes[k] for k in y.tolist()] == seen  # labels 0-4 are the task's classes in order
        assert data.train.tensors[1].bincount().tolist() == [10] * 5
        assert data.val.tensors[1].bincount().tolist() == [5] * 5
        assert len(data.test) == 50 and data.classes == tuple(data.classes)
    assert source.classes == ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
    assert target.classes == ("Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    # no validation image is a training image; the smaller training set is the start of the
    # larger, and the validation set does not depend on the training size
    flat = target.train.tensors[0].flatten(1)
    assert not (target.val.tensors[0].flatten(1)[:, None] == flat[None]).all(-1).any()
    small = task_datasets("target", per_class=4, val_per_class=5, root=root, augment=False)
    assert torch.equal(small.val.tensors[0], target.val.tensors[0])
    big_rows = {tuple(r.tolist()) for r in flat}
    assert all(tuple(r.tolist()) in big_rows for r in small.train.tensors[0].flatten(1))
    again = task_datasets("target", per_class=10, val_per_class=5, root=root, augment=False)
    assert torch.equal(again.train.tensors[0], target.train.tensors[0])
    other = task_datasets("target", per_class=10, val_per_class=5, root=root, augment=False, split_seed=1)
    assert not torch.equal(other.train.tensors[0], target.train.tensors[0])
    with pytest.raises(OptionError, match=r"class 5 \(Sandal\) has 40 training images; .* need 45"):
        task_datasets("target", per_class=40, val_per_class=5, root=root)
    with pytest.raises(OptionError, match="transfer task 'other' is not valid"):
        task_datasets("other", root=root)


def _flat_items(root: Path) -> Path:
    """IDX files whose items are flat squares of brightness 100 + 15 * class."""
    root.mkdir(parents=True)
    for split, n in (("train", 600), ("t10k", 100)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.broadcast_to((100 + 15 * labels)[:, None, None], (n, 28, 28)).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte", np.ascontiguousarray(images))
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


def _items(data: Path, split: str) -> tuple[set[int], list[tuple[int, set[int]]]]:
    """The classes whose items a split's canvases show (read from the pixels), and per box
    its label with the classes seen inside it."""
    from PIL import Image

    shown: set[int] = set()
    boxes = []
    for label_file in sorted((data.parent / "labels" / split).glob("*.txt")):
        pixels = np.asarray(Image.open(data.parent / "images" / split / f"{label_file.stem}.png").convert("L"))
        shown |= {(int(v) - 100) // 15 for v in np.unique(pixels) if v >= 100}
        size = pixels.shape[0]
        for line in label_file.read_text().splitlines():
            c, x, y, w, h = (float(v) for v in line.split())
            x0, x1 = round((x - w / 2) * size), round((x + w / 2) * size)
            y0, y1 = round((y - h / 2) * size), round((y + h / 2) * size)
            inside = np.unique(pixels[y0:y1, x0:x1])
            boxes.append((int(c), {(int(v) - 100) // 15 for v in inside if v >= 100}))
    return shown, boxes


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".png", ".txt"):
            h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_the_canvases_hold_only_their_tasks_items_and_come_back_the_same(tmp_path: Path) -> None:
    fm = _flat_items(tmp_path / "fm")
    sizes = {"train": 12, "val": 4, "test": 4}
    data = {task: task_canvases(tmp_path / "a", task, sizes, canvas=64, source=fm) for task in ("source", "target")}
    for task, classes in (("source", SOURCE_CLASSES), ("target", TARGET_CLASSES)):
        for split in sizes:
            shown, boxes = _items(data[task], split)
            assert shown and shown <= set(classes), (task, split)  # no item of the other task's classes
            assert boxes and all(classes[label] in seen for label, seen in boxes), (task, split)
    assert "  0: Sandal\n  1: Shirt\n  2: Sneaker\n  3: Bag\n  4: Ankle boot\n" in data["target"].read_text()
    assert "  0: T-shirt/top\n  1: Trouser\n  2: Pullover\n  3: Dress\n  4: Coat\n" in data["source"].read_text()
    # the same seed makes the same canvases, byte for byte, in another folder
    again = task_canvases(tmp_path / "b", "target", sizes, canvas=64, source=fm)
    assert _digest(again.parent) == _digest(data["target"].parent)
    assert _digest(data["source"].parent) != _digest(data["target"].parent)
    # the low-data set is the first canvases of the larger one
    small = first_canvases(data["target"], 5)
    text = small.read_text()
    assert "train: images/train5\n" in text and "val: images/val\n" in text
    root = data["target"].parent
    assert sorted(p.name for p in (root / "images" / "train5").glob("*.png")) == [f"{k:05d}.png" for k in range(5)]
    assert (root / "labels" / "train5" / "00004.txt").read_bytes() == (root / "labels" / "train" / "00004.txt").read_bytes()
    with pytest.raises(OptionError, match="12 train canvases, fewer than the 13 asked for"):
        first_canvases(data["target"], 13)
