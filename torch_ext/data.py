"""Data sets for :mod:`torch_ext.train`.

Three sources, none of which is ever downloaded:

* ``digits``: scikit-learn's bundled 8x8 hand-written digits (1797 images,
  10 classes), scaled to ``image_size`` (default 32) with bilinear
  interpolation, one grey channel, split 80/20 stratified with a fixed seed.
* ``cifar10``: a local folder in the standard "CIFAR-10 python version"
  layout (``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` pickles,
  optionally inside ``cifar-10-batches-py/``).
* ``image_folder``: a local folder with one sub-folder per class. If it has
  ``train/`` and ``test/`` (or ``val/``) sub-folders, those are the splits;
  otherwise the images are split 80/20 stratified with a fixed seed.

Every image is a float32 ``[C, H, W]`` tensor with values in ``[0, 1]``
(Blueoil's ``DivideBy255`` pre-processing; the digits' 0..16 grey levels are
divided by 16). Training-time augmentation (pad + random crop, optional
horizontal flip) is done on whole batches by :func:`augment_batch`, so it can
run on the training device and draws from one explicit generator whose state
the training checkpoint saves.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = [
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "DataSplits",
    "InMemoryImages",
    "ImageFiles",
    "load_dataset",
    "load_digits",
    "load_cifar10",
    "load_image_folder",
    "augment_batch",
]

DATASETS = ("digits", "cifar10", "image_folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# The fixed seed of the train/test split, independent of the training seed so
# that runs with different --seed values are scored on the same test images.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class InMemoryImages(Dataset):
    """Images held in one tensor: uint8 (scaled by 1/255 on access) or float.

    Args:
        images: ``[N, C, H, W]`` uint8 or floating tensor.
        labels: ``[N]`` integer class indices.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"InMemoryImages: expected images [N, C, H, W] and labels [N], got "
                f"{tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images.contiguous()
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        """``(image float32 [C, H, W] in [0, 1], label)``."""
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.to(torch.float32).div_(255.0)
        return image, int(self.labels[index])


class ImageFiles(Dataset):
    """Images read from files on access (PIL), converted to RGB and resized.

    Args:
        paths: image file paths.
        labels: their class indices.
        image_size: output height and width.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], image_size: int) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        """``(image float32 [3, S, S] in [0, 1], label)``."""
        from PIL import Image  # imported here so that digits/cifar10 need no PIL

        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
                array = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as exc:  # PIL raises UnidentifiedImageError (an OSError)
            raise ValueError(f"image_folder: cannot read image file {str(path)!r}: {exc}") from exc
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        return image, int(self.labels[index])


@dataclass
class DataSplits:
    """A data set ready for training.

    Attributes:
        name: data set name (one of :data:`DATASETS`).
        train, test: the two splits; items are ``(image [C, H, W], label)``.
        num_classes, in_channels, image_size: what the model needs to know.
        class_names: one name per class index.
        flip: whether horizontal flips are a sensible augmentation (not for digits).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    class_names: List[str] = field(default_factory=list)
    flip: bool = True


def _check_image_size(image_size: Optional[int], default: int) -> int:
    if image_size is None:
        return default
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    return image_size


def _stratified_split(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Fixed-seed stratified 80/20 split of ``range(len(labels))``."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    counts = np.bincount(labels)
    # Stratification needs >= 2 images per class and a test split that can hold
    # one image of each class; with fewer, fall back to a plain seeded split.
    n_test = int(np.ceil(TEST_FRACTION * len(labels)))
    can_stratify = counts[counts > 0].min() >= 2 and n_test >= int((counts > 0).sum())
    train_idx, test_idx = train_test_split(
        indices,
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels if can_stratify else None,
    )
    return np.sort(train_idx), np.sort(test_idx)


def load_digits(image_size: Optional[int] = None) -> DataSplits:
    """scikit-learn's digits, scaled to ``image_size`` (default 32), values in [0, 1]."""
    from sklearn.datasets import load_digits as sk_load_digits

    size = _check_image_size(image_size, 32)
    bunch = sk_load_digits()
    # The 8x8 images hold grey levels 0..16.
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)  # bilinear cannot overshoot, but keep the contract explicit
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = _stratified_split(labels)
    labels_t = torch.from_numpy(labels)
    return DataSplits(
        name="digits",
        train=InMemoryImages(images[train_idx], labels_t[train_idx]),
        test=InMemoryImages(images[test_idx], labels_t[test_idx]),
        num_classes=10,
        in_channels=1,
        image_size=size,
        class_names=[str(i) for i in range(10)],
        flip=False,  # a mirrored 2 is not a 2
    )


def _require_dir(data_dir: Optional[os.PathLike], dataset: str) -> Path:
    if data_dir is None:
        raise ValueError(f"data_dir is required for dataset={dataset!r} (it is never downloaded)")
    path = Path(data_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} for dataset={dataset!r} is not a directory")
    return path


def _read_cifar_batch(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # The official CIFAR-10 python batches are pickles written by Python 2.
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"cifar10: {str(path)!r} is not a CIFAR-10 python batch: {exc!r}") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"cifar10: {str(path)!r} has data of shape {data.shape} and {labels.shape[0]} labels; "
            "expected [N, 3072] and N labels"
        )
    return data.reshape(-1, 3, 32, 32), labels


def _resize_uint8(images: torch.Tensor, size: int, chunk: int = 2048) -> torch.Tensor:
    """Bilinear resize of a uint8 ``[N, C, H, W]`` tensor, in chunks to bound memory."""
    out = []
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float32)
        part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(part.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out) if out else images.new_empty((0, images.shape[1], size, size))


def load_cifar10(data_dir: os.PathLike, image_size: Optional[int] = None) -> DataSplits:
    """CIFAR-10 from the standard python batches in ``data_dir`` (never downloaded).

    ``data_dir`` holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``,
    directly or in a ``cifar-10-batches-py`` sub-folder. Note that the batches
    are pickles: only point this at files you trust.
    """
    root = _require_dir(data_dir, "cifar10")
    if not (root / "test_batch").is_file() and (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"data_dir={str(data_dir)!r} is not a CIFAR-10 python-batches folder: missing {missing} "
            "(expected data_batch_1..data_batch_5 and test_batch)"
        )
    train = [_read_cifar_batch(root / n) for n in names[:5]]
    test_x, test_y = _read_cifar_batch(root / "test_batch")
    train_x = torch.from_numpy(np.concatenate([x for x, _ in train]))
    train_y = torch.from_numpy(np.concatenate([y for _, y in train]))
    test_x, test_y = torch.from_numpy(test_x), torch.from_numpy(test_y)
    class_names = [str(i) for i in range(10)]
    meta = root / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as f:
                class_names = [n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"]]
        except Exception:  # the names are cosmetic; a damaged meta file is not fatal
            pass
    all_labels = torch.cat([train_y, test_y])
    if all_labels.numel() and (all_labels.min() < 0 or all_labels.max() > 9):
        raise ValueError(f"cifar10: labels in {str(root)!r} must be 0..9, found {all_labels.min()}..{all_labels.max()}")
    size = _check_image_size(image_size, 32)
    if size != 32:
        train_x, test_x = _resize_uint8(train_x, size), _resize_uint8(test_x, size)
    return DataSplits(
        name="cifar10",
        train=InMemoryImages(train_x, train_y),
        test=InMemoryImages(test_x, test_y),
        num_classes=10,
        in_channels=3,
        image_size=size,
        class_names=class_names,
        flip=True,
    )


def _list_class_folders(root: Path) -> List[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _list_images(folder: Path) -> List[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan(root: Path, class_names: Optional[List[str]] = None) -> Tuple[List[Path], List[int], List[str]]:
    folders = _list_class_folders(root)
    names = [p.name for p in folders] if class_names is None else class_names
    index = {name: i for i, name in enumerate(names)}
    paths: List[Path] = []
    labels: List[int] = []
    for folder in folders:
        if folder.name not in index:
            raise ValueError(
                f"image_folder: class folder {str(folder)!r} is not among the training classes {names}"
            )
        for p in _list_images(folder):
            paths.append(p)
            labels.append(index[folder.name])
    return paths, labels, names


def load_image_folder(data_dir: os.PathLike, image_size: Optional[int] = None) -> DataSplits:
    """Images laid out one sub-folder per class, resized to ``image_size`` (default 32).

    ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` (or ``val``) are
    used as given; otherwise ``data_dir/<class>/*`` is split 80/20 stratified
    with a fixed seed. Images are converted to RGB.
    """
    root = _require_dir(data_dir, "image_folder")
    size = _check_image_size(image_size, 32)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train_paths, train_labels, names = _scan(root / "train")
        test_paths, test_labels, _ = _scan(test_dir, names)
    else:
        paths, labels, names = _scan(root)
        if paths:
            train_idx, test_idx = _stratified_split(np.asarray(labels))
            train_paths, train_labels = [paths[i] for i in train_idx], [labels[i] for i in train_idx]
            test_paths, test_labels = [paths[i] for i in test_idx], [labels[i] for i in test_idx]
        else:
            train_paths = train_labels = test_paths = test_labels = []
    if len(names) < 2:
        raise ValueError(
            f"data_dir={str(data_dir)!r} for dataset='image_folder' needs at least 2 class sub-folders, "
            f"found {len(names)}: {names}"
        )
    if not train_paths or not test_paths:
        raise ValueError(
            f"data_dir={str(data_dir)!r} for dataset='image_folder' has no images with extensions "
            f"{IMAGE_EXTENSIONS} in its train or test split"
        )
    return DataSplits(
        name="image_folder",
        train=ImageFiles(train_paths, train_labels, size),
        test=ImageFiles(test_paths, test_labels, size),
        num_classes=len(names),
        in_channels=3,
        image_size=size,
        class_names=names,
        flip=True,
    )


def load_dataset(name: str, data_dir: Optional[os.PathLike] = None, image_size: Optional[int] = None) -> DataSplits:
    """Load data set ``name`` (one of :data:`DATASETS`).

    Raises:
        ValueError: unknown ``name``, missing ``data_dir`` or malformed data.
        FileNotFoundError: ``data_dir`` or an expected file does not exist.
    """
    if name == "digits":
        return load_digits(image_size)
    if name == "cifar10":
        return load_cifar10(data_dir, image_size)
    if name == "image_folder":
        return load_image_folder(data_dir, image_size)
    raise ValueError(f"dataset={name!r} is unknown; choose one of {list(DATASETS)}")


def augment_batch(
    images: torch.Tensor, *, pad: int, flip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Blueoil's ``Pad(pad)`` + ``Crop(size)`` + ``FlipLeftRight`` on a batch.

    Each image is zero-padded by ``pad`` pixels on every side and cropped back
    to its size at a uniformly random offset, then (if ``flip``) mirrored
    left-right with probability 1/2. The random numbers come from
    ``generator`` (a CPU generator, so the same seed gives the same
    augmentation on every device) and are drawn in a fixed amount per batch.

    Args:
        images: ``[N, C, H, W]`` batch on any device.
        pad: padding in pixels (0 disables the crop).
        flip: whether to apply random horizontal flips.
        generator: CPU ``torch.Generator``.
    """
    n, _, h, w = images.shape
    # Always draw the same numbers, whatever pad/flip are, so that the generator
    # advances identically and resumed runs line up batch for batch.
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    if pad > 0:
        padded = F.pad(images, (pad, pad, pad, pad))
        device = images.device
        rows = offsets[0].to(device)[:, None] + torch.arange(h, device=device)  # [N, H]
        cols = offsets[1].to(device)[:, None] + torch.arange(w, device=device)  # [N, W]
        batch_index = torch.arange(n, device=device)[:, None, None, None]
        channel_index = torch.arange(images.shape[1], device=device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        images = torch.where(flips.to(images.device)[:, None, None, None], images.flip(3), images)
    return images
