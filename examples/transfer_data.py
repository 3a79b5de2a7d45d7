"""The transfer split of Fashion-MNIST: a source task and a target task on disjoint classes.

The source task holds classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), the target
task classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot): other objects, the same image
statistics. A network pretrained on the source task is fine-tuned on the target task, the
way a backbone pretrained on one data set is fine-tuned on a user's own.

Both tasks come as classification images (:func:`task_datasets`) and as detection canvases
(:func:`task_canvases`, the canvas generator of ``examples/yolo.py`` fed only the task's
items). Labels are renumbered 0-4 within each task. The target's training sets come in a
low-data size and a larger one; the smaller is the first part of the larger (the same
images, so the two sizes differ by the amount of data alone), and the validation and test
sets are fixed. Everything is fixed by its seed: the committed results depend on it.

Imported by name from ``examples/`` (``python examples/NAME.py`` puts that folder first on
``sys.path``), like ``example_data``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from example_data import (  # isort: skip  (examples/example_data.py)
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    RandomShift,
    load_fashion_mnist,
)
from retrofit.data import DataSplits
from retrofit.errors import OptionError

__all__ = ["TASKS", "SOURCE_CLASSES", "TARGET_CLASSES", "CANVAS_SEEDS", "task_classes", "task_datasets",
           "task_canvases", "first_canvases"]

SOURCE_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
TARGET_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)
TASKS: dict[str, tuple[int, ...]] = {"source": SOURCE_CLASSES, "target": TARGET_CLASSES}
# The canvas generator's seed per task: fixed, so the canvases are the same on every machine.
CANVAS_SEEDS: dict[str, int] = {"source": 35_001, "target": 35_002}


def task_classes(task: str) -> tuple[int, ...]:
    """The Fashion-MNIST class indices of ``task`` (``"source"`` or ``"target"``).

    Raises:
        OptionError: an unknown task.
    """
    if task not in TASKS:
        raise OptionError(f"transfer task {task!r} is not valid (valid: {', '.join(TASKS)})")
    return TASKS[task]


def _normalise(x: Tensor) -> Tensor:
    return ((x.float() / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).unsqueeze(1)


def task_datasets(
    task: str,
    *,
    per_class: int | None = None,
    val_per_class: int = 200,
    root: str | Path | None = None,
    split_seed: int = 0,
    augment: bool = True,
) -> DataSplits:
    """Classification images of one task: train, val (held out of Fashion-MNIST's training
    images) and test (every test image of the task's classes), labels 0-4.

    Each class's training images are shuffled once by ``split_seed`` (a generator of its
    own per class, so that one class's order does not depend on another's): the first
    ``val_per_class`` are the validation set, the next ``per_class`` the training set.
    The training set of a smaller ``per_class`` is therefore the start of a larger one's,
    and the validation set is the same for every ``per_class``.

    Args:
        task: ``"source"`` or ``"target"``.
        per_class: training images per class (default: all not held out).
        val_per_class: validation images per class.
        root: folder of the IDX files (default: Debian's).
        split_seed: seed of the shuffle.
        augment: random shifts of up to 2 pixels and left-right flips on the train split,
            as ``example_data.fashion_mnist_datasets`` does.

    Raises:
        OptionError: an unknown task, or sizes a class cannot hold.
        DataError: the IDX files are missing or malformed.
    """
    classes = task_classes(task)
    images, labels = load_fashion_mnist(root, "train")
    test_images, test_labels = load_fashion_mnist(root, "test")
    train_idx, val_idx = [], []
    for c in classes:
        idx = (labels == c).nonzero().flatten()
        need = val_per_class + (per_class or 0)
        if val_per_class < 0 or (per_class is not None and per_class < 1) or need > len(idx):
            raise OptionError(f"class {c} ({FASHION_MNIST_CLASSES[c]}) has {len(idx)} training images; "
                              f"val_per_class={val_per_class} and per_class={per_class} need {need} "
                              "(per_class at least 1)")
        idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(split_seed * 100 + c))]
        val_idx.append(idx[:val_per_class])
        train_idx.append(idx[val_per_class:] if per_class is None else idx[val_per_class:val_per_class + per_class])
    relabel = torch.full((len(FASHION_MNIST_CLASSES),), -1, dtype=torch.long)
    relabel[list(classes)] = torch.arange(len(classes))
    tr, va = torch.cat(train_idx), torch.cat(val_idx)
    in_test = torch.isin(test_labels, torch.tensor(classes))
    train: Dataset = TensorDataset(_normalise(images[tr]), relabel[labels[tr]])
    if augment:
        train = RandomShift(train, 2, True, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
    val = TensorDataset(_normalise(images[va]), relabel[labels[va]])
    test = TensorDataset(_normalise(test_images[in_test]), relabel[test_labels[in_test]])
    names = tuple(FASHION_MNIST_CLASSES[c] for c in classes)
    config = {"input_size": (1, 28, 28), "mean": (FASHION_MNIST_MEAN,), "std": (FASHION_MNIST_STD,),
              "source": str(FASHION_MNIST_ROOT if root is None else root), "task": task,
              "fashion_mnist_classes": list(classes), "per_class": per_class, "val_per_class": val_per_class,
              "split_seed": split_seed}
    return DataSplits(train, val, names, (1, 28, 28), config, test)


def task_canvases(root: Path, task: str, sizes: dict[str, int], canvas: int = 128,
                  source: Path | None = None) -> Path:
    """Detection canvases of one task under ``root / task`` (``examples/yolo.py``'s generator,
    fed only the task's items, seed :data:`CANVAS_SEEDS`); the data yaml. Training and
    validation canvases take items from disjoint parts of Fashion-MNIST's training images,
    test canvases from its test images. The same arguments give the same files.

    Raises:
        OptionError: an unknown task.
    """
    from yolo import make_dataset  # isort: skip  (examples/yolo.py)

    return make_dataset(root / task, sizes, canvas, seed=CANVAS_SEEDS[task], source=source,
                        classes=task_classes(task))


def first_canvases(data: Path, n: int, split: str = "train") -> Path:
    """A data yaml beside ``data`` whose ``split`` is the first ``n`` canvases of ``data``'s
    (copied to ``images/<split><n>``); its other splits are ``data``'s.

    Raises:
        OptionError: ``data`` has fewer than ``n`` canvases in ``split``.
    """
    root = data.parent
    name = f"{split}{n}"
    images = sorted((root / "images" / split).glob("*.png"))
    if len(images) < n:
        raise OptionError(f"{data}: {len(images)} {split} canvases, fewer than the {n} asked for")
    out = root / f"data-{name}.yaml"
    stamp = root / "images" / name / ".complete"
    if not stamp.is_file():
        for kind in ("images", "labels"):
            shutil.rmtree(root / kind / name, ignore_errors=True)
            (root / kind / name).mkdir(parents=True)
        for image in images[:n]:
            shutil.copyfile(image, root / "images" / name / image.name)
            label = root / "labels" / split / f"{image.stem}.txt"
            shutil.copyfile(label, root / "labels" / name / label.name)
        stamp.write_text(str(n))
    lines = data.read_text().splitlines(keepends=True)
    out.write_text("".join(f"{split}: images/{name}\n" if line.startswith(f"{split}:") else line for line in lines))
    return out
