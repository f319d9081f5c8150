"""Datasets of ``bsr-finetune``: the built-in digits task, torchvision sets and ImageFolder dirs.

Every dataset yields ``(image, label)`` with ``image`` a (3, H, W) float tensor normalised with
the model's mean and std, and ``label`` an int in ``0 .. num_classes - 1``.

The built-in task needs no network: scikit-learn's ``load_digits`` (1,797 real 8x8 scans of
hand-written digits, shipped with scikit-learn) upscaled bilinearly. The source task is digits
0-4 (what the shipped model was pre-trained on), the target task digits 5-9.

Batches are drawn by :class:`~bsr_kernels.finetune.distributed.GlobalBatchSampler` (re-exported
here), which makes the samples of every optimizer step
independent of the number of processes: a run with ``torchrun --nproc_per_node 2`` sees the same
global batches as a single process.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .distributed import GlobalBatchSampler, ShardSampler  # noqa: F401  (re-exported)

__all__ = [
    "DIGITS_SOURCE_CLASSES",
    "DIGITS_TARGET_CLASSES",
    "TORCHVISION_SETS",
    "DataBundle",
    "TensorImageDataset",
    "digits_split",
    "build_data",
    "GlobalBatchSampler",
    "ShardSampler",
    "default_data_root",
    "DatasetUnavailableError",
    "BAD_IMAGE_MODES",
    "data_kind",
]

DIGITS_SOURCE_CLASSES = (0, 1, 2, 3, 4)
DIGITS_TARGET_CLASSES = (5, 6, 7, 8, 9)
#: Names ``--data`` accepts besides a directory.
TORCHVISION_SETS = ("cifar10", "cifar100", "flowers102", "pets")
#: What ``--bad-images`` does with ImageFolder files that cannot be read: every file is checked
#: at start-up (opened, verified and decoded by PIL, JPEGs at an eighth of their size, on a few
#: threads; a truncated JPEG passes PIL's verify() alone); ``error`` stops with the list of bad
#: files, ``skip`` leaves them out with a counted warning.
BAD_IMAGE_MODES = ("error", "skip")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetUnavailableError(RuntimeError):
    """A named dataset that cannot be downloaded or opened (typically: offline)."""


@dataclasses.dataclass
class DataBundle:
    """A train/test pair and what the report needs to know about it.

    Attributes:
        name: "digits", a torchvision set name, or the ImageFolder path.
        train, test: datasets of ((3, H, W) float image, int label).
        num_classes: number of classes.
        classes: class names, ``num_classes`` of them.
        mean, std: the per-channel normalisation applied (to undo it for pictures).
    """

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    classes: list
    mean: tuple
    std: tuple


class TensorImageDataset(Dataset):
    """Images held in one tensor, with an optional random shift for training.

    Args:
        images: (N, 3, H, W) float, already normalised.
        labels: (N,) int64.
        max_shift: training augmentation: shift each image by up to this many pixels in each
            direction (edge pixels replicated); 0 for none.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, max_shift: int = 0):
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"images must be (N, C, H, W) with N = len(labels), got "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images, self.labels, self.max_shift = images, labels, int(max_shift)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int):
        x = self.images[i]
        s = self.max_shift
        if s:
            dy, dx = torch.randint(-s, s + 1, (2,)).tolist()
            h, w = x.shape[1:]
            x = F.pad(x[None], (s, s, s, s), mode="replicate")[0]
            x = x[:, s + dy:s + dy + h, s + dx:s + dx + w]
        return x, int(self.labels[i])


def _stratified_split(labels: torch.Tensor, test_fraction: float, seed: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test indices, ``test_fraction`` of every class in the test part."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(idx.numel() * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def digits_split(classes: Sequence[int], img_size: int, mean: Sequence[float] = (0.5,) * 3,
                 std: Sequence[float] = (0.5,) * 3, test_fraction: float = 1 / 3,
                 split_seed: int = 0, max_shift: int = 0
                 ) -> tuple[TensorImageDataset, TensorImageDataset]:
    """scikit-learn's digits restricted to ``classes``, upscaled and split stratified.

    Args:
        classes: digit values to keep; label ``i`` is ``classes[i]``.
        img_size: side of the upscaled image in pixels (bilinear from 8 x 8).
        mean, std: per-channel normalisation applied to the [0, 1] grey image repeated to RGB.
        test_fraction: fraction of each class held out for testing.
        split_seed: seed of the split (fixed, so the test set never changes with ``--seed``).
        max_shift: random-shift augmentation of the training part, in pixels.

    Returns:
        (train, test) datasets of ((3, img_size, img_size), label).
    """
    from sklearn.datasets import load_digits

    if not isinstance(img_size, int) or img_size < 8:
        raise ValueError(f"--img-size {img_size!r}: the digits data needs at least 8 px")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0   # (N, 1, 8, 8)
    target = torch.tensor(digits.target)
    classes_t = torch.tensor(list(classes))
    keep = torch.isin(target, classes_t)
    images, target = images[keep], target[keep]
    labels = (target[:, None] == classes_t[None]).int().argmax(1).long()
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear",
                           align_corners=False).clamp_(0, 1)
    images = images.expand(-1, 3, -1, -1)
    images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    tr, te = _stratified_split(labels, test_fraction, split_seed)
    return (TensorImageDataset(images[tr].contiguous(), labels[tr], max_shift),
            TensorImageDataset(images[te].contiguous(), labels[te]))


def default_data_root() -> Path:
    """Where torchvision sets are downloaded: ``$BSR_DATA`` or ``~/.cache/bsr_kernels/data``."""
    return Path(os.environ.get("BSR_DATA", Path.home() / ".cache" / "bsr_kernels" / "data"))


#: PIL modes of 16-bit greyscale images (PNG and TIFF; older Pillow opens 16-bit PNGs as "I").
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
#: Formats whose mode "I" images hold 16-bit values (0..65535): 16-bit PNG (older Pillow) and
#: PGM with a maxval above 255 (Pillow scales it to 0..65535). A TIFF in mode "I" holds signed
#: 16-bit or 32-bit integers, which have no defined white: it is refused, like mode "F".
_SIXTEEN_BIT_I_FORMATS = (None, "PNG", "PPM")


def _pixel_range_problem(img) -> Optional[str]:
    """Why the pixels of ``img`` cannot be mapped to 8 bits by a well-defined rule, or None.
    Floating-point ("F") and 32-bit / signed integer ("I" from a TIFF) images have no fixed
    range (a float image may hold 0..1, 0..255 or anything); PIL's convert("RGB") clips them
    (0..1 floats come out black, small integers all but black), so they are refused instead."""
    if img.mode == "F":
        return ("32-bit floating-point pixels (mode F) have no defined range to map to 0..255; "
                "save the image as 8- or 16-bit")
    if img.mode == "I" and img.format not in _SIXTEEN_BIT_I_FORMATS:
        return (f"signed or 32-bit integer pixels (mode I, {img.format}) have no defined range "
                "to map to 0..255; save the image as 8- or 16-bit")
    return None


def _to_rgb(img):
    """``img`` as 8-bit RGB. 16-bit greyscale is scaled down (0..65535 to 0..255): PIL's own
    convert("RGB") clips it at 255, which leaves all but the darkest pixels white. Float and
    32-bit integer images are refused (:func:`_pixel_range_problem`) with a ValueError."""
    from PIL import Image

    why = _pixel_range_problem(img)
    if why is not None:
        raise ValueError(why)
    if img.mode in _SIXTEEN_BIT_MODES:
        import numpy as np
        a = np.asarray(img, dtype=np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(a, mode="L").convert("RGB")
    return img.convert("RGB")


def _transforms(img_size: int, mean, std, small_images: bool,
                data_config: Optional[dict] = None):
    """Train and test transforms. Photos use timm's :func:`~timm.data.create_transform` with
    the model's data config (interpolation, crop_pct, crop_mode, mean, std): random resized
    crops (scale 0.35-1) and flips for training, resize and centre crop for testing. Small
    images (CIFAR) are upscaled whole, with padded random crops and flips for training."""
    from timm.data import create_transform
    from torchvision import transforms as T

    cfg = dict(data_config or {})
    interp = cfg.get("interpolation") or "bilinear"
    to_rgb = T.Lambda(_to_rgb)
    if small_images:   # CIFAR: 32 px images, upscaled whole
        from timm.data.transforms import str_to_interp_mode
        mode = str_to_interp_mode(interp)
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        train = T.Compose([to_rgb, T.Resize((img_size, img_size), interpolation=mode),
                           T.RandomCrop(img_size, padding=img_size // 8, padding_mode="reflect"),
                           T.RandomHorizontalFlip(), *norm])
        test = T.Compose([to_rgb, T.Resize((img_size, img_size), interpolation=mode), *norm])
        return train, test
    common = dict(input_size=(3, img_size, img_size), interpolation=interp, mean=tuple(mean),
                  std=tuple(std))
    train = create_transform(is_training=True, scale=(0.35, 1.0), hflip=0.5,
                             color_jitter=None, **common)
    test = create_transform(is_training=False, crop_pct=cfg.get("crop_pct", 0.875),
                            crop_mode=cfg.get("crop_mode", "center"), **common)
    return T.Compose([to_rgb, train]), T.Compose([to_rgb, test])


def _torchvision_set(name: str, root: Path, img_size: int, mean, std,
                     data_config: Optional[dict] = None) -> DataBundle:
    import torchvision.datasets as D

    small = name.startswith("cifar")
    train_tf, test_tf = _transforms(img_size, mean, std, small, data_config)
    try:
        if name in ("cifar10", "cifar100"):
            cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
            train = cls(str(root), train=True, download=True, transform=train_tf)
            test = cls(str(root), train=False, download=True, transform=test_tf)
            classes = list(train.classes)
        elif name == "flowers102":
            train = torch.utils.data.ConcatDataset([
                D.Flowers102(str(root), split=s, download=True, transform=train_tf)
                for s in ("train", "val")])
            test = D.Flowers102(str(root), split="test", download=True, transform=test_tf)
            classes = [str(i) for i in range(102)]
        else:
            train = D.OxfordIIITPet(str(root), split="trainval", download=True,
                                    transform=train_tf)
            test = D.OxfordIIITPet(str(root), split="test", download=True, transform=test_tf)
            classes = list(train.classes)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise DatasetUnavailableError(
            f"--data {name}: could not download or open the dataset under {root} ({e}). "
            f"Without a network, download it elsewhere and copy it there (or set --data-root / "
            f"$BSR_DATA), or pass an ImageFolder directory") from e
    return DataBundle(name, train, test, len(classes), classes, tuple(mean), tuple(std))


def _load_image(path: str):
    """ImageFolder's loader, with an error that names the file (a file that passed the
    start-up check but fails to decode, e.g. truncated). The EXIF orientation is applied (a
    phone photo stored sideways with orientation 6 is turned upright, as viewers show it)."""
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            why = _pixel_range_problem(img)  # before exif_transpose: its copy has no format
            if why is not None:
                raise ValueError(why)
            return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"--data: cannot read image {path} ({type(e).__name__}: {e}); remove "
                         "or replace it") from e


def _unreadable(path: str) -> Optional[str]:
    """Why PIL cannot open, verify and decode the image file ``path``, or None when it can.
    verify() alone reads a JPEG's headers only, so a truncated one would pass here and stop the
    run when training reaches it; the decode (at an eighth of the size for a JPEG, which still
    reads its whole stream) finds it. Images without a defined 8-bit range (float and 32-bit
    integer TIFFs, :func:`_pixel_range_problem`) are reported here too."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:  # verify() leaves the image unusable: open it again
            img.draft(img.mode, (1, 1))
            img.load()
            why = _pixel_range_problem(img)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return None if why is None else f"ValueError: {why}"


def _check_images(path: Path, folders: list, bad_images: str, warn: Callable,
                  test_split: Optional[str] = None) -> None:
    """Verifies every image of the ImageFolder datasets ``folders`` (which may share files;
    the first is the one that trains); ``bad_images="skip"`` removes the unreadable ones from
    all of them, and refuses when that leaves a class of the first with no images, or (with
    ``test_split``, the name of the second's folder in a train/ + val/ layout) a class of the
    second: an empty class folder is refused there too."""
    if bad_images not in BAD_IMAGE_MODES:
        raise ValueError(f"--bad-images must be one of {', '.join(BAD_IMAGE_MODES)}, "
                         f"got {bad_images!r}")
    files = sorted({f for ds in folders for f, _ in ds.samples})
    from concurrent.futures import ThreadPoolExecutor
    # PIL decodes without the GIL; under torchrun every process of this machine checks too
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    with ThreadPoolExecutor(max_workers=max(1, min(8, (os.cpu_count() or 1) // local))) as pool:
        bad = {f: why for f, why in zip(files, pool.map(_unreadable, files)) if why is not None}
    if not bad:
        return
    listed = "; ".join(f"{f} ({why})" for f, why in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    if bad_images == "error":
        raise ValueError(f"--data {path}: {len(bad)} of {len(files)} image files cannot be read: "
                         f"{listed}{more}. Remove or replace them, or pass --bad-images skip to "
                         "train without them")
    left = {c for f, c in folders[0].samples if f not in bad}  # folders[0]: what trains
    emptied = [name for name, c in folders[0].class_to_idx.items() if c not in left]
    if emptied:
        raise ValueError(f"--data {path}: --bad-images skip would leave class folder(s) "
                         f"{', '.join(emptied)} with no readable training image ({listed}{more});"
                         " such a class would still get an output that never trains. Remove or "
                         "replace those files or folders")
    if test_split is not None:
        left = {c for f, c in folders[1].samples if f not in bad}
        emptied = [name for name, c in folders[1].class_to_idx.items() if c not in left]
        if emptied:
            raise ValueError(f"--data {path}: --bad-images skip would leave class folder(s) "
                             f"{', '.join(emptied)} of {test_split}/ with no readable image "
                             f"({listed}{more}); the test accuracy would not cover them (an "
                             f"empty class folder of {test_split}/ is refused too). Remove or "
                             "replace those files or folders")
    for ds in folders:
        ds.samples = [(f, c) for f, c in ds.samples if f not in bad]
        ds.imgs = ds.samples
        ds.targets = [c for _, c in ds.samples]
    warn(f"--data {path}: skipped {len(bad)} of {len(files)} image files that cannot be read "
         f"(--bad-images skip): {listed}{more}")


def _hidden(name: str) -> bool:
    """A file or folder that is no data: named ``.*`` (``.DS_Store``, ``.ipynb_checkpoints``,
    ``.thumbs``, macOS's AppleDouble ``._photo.jpg``) or macOS's zip folder ``__MACOSX``."""
    return name.startswith(".") or name == "__MACOSX"


def _visible_samples(directory: str, class_to_idx: dict, extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> list:
    """torchvision's ``make_dataset`` without hidden files and folders (:func:`_hidden`) at any
    depth, and visiting every real folder once: symbolic links are followed, but one that leads
    back to a folder already seen (``cat/loop -> ..``, or into another class) is left out, where
    torchvision's walk repeated the images (or looped until the path grew too long). Same
    sample order as torchvision's."""
    from torchvision.datasets.folder import has_file_allowed_extension

    if is_valid_file is None:
        def is_valid_file(f):
            return has_file_allowed_extension(f, extensions)
    top = os.path.realpath(directory)
    seen = {os.path.realpath(os.path.join(directory, c)) for c in class_to_idx}
    while True:   # the root and its ancestors: a link to any of them is a loop
        seen.add(top)
        if os.path.dirname(top) == top:
            break
        top = os.path.dirname(top)
    samples, found = [], set()
    for cls in sorted(class_to_idx):
        walked = []
        for root, dirs, files in os.walk(os.path.join(directory, cls), followlinks=True):
            keep = []
            for d in sorted(dirs):
                real = os.path.realpath(os.path.join(root, d))
                if not _hidden(d) and real not in seen:
                    seen.add(real)
                    keep.append(d)
            dirs[:] = keep
            walked.append((root, files))
        for root, files in sorted(walked):
            for f in sorted(files):
                if not _hidden(f) and is_valid_file(os.path.join(root, f)):
                    samples.append((os.path.join(root, f), class_to_idx[cls]))
                    found.add(cls)
    empty = sorted(set(class_to_idx) - found)
    if empty and not allow_empty:
        raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)} "
                                "(hidden files, named .*, are left out)")
    return samples


def _visible_image_folder() -> type:
    """torchvision's ImageFolder whose classes are the folders not hidden (:func:`_hidden`): a
    ``.ipynb_checkpoints``, ``.git`` or ``__MACOSX`` folder beside the class folders is no class;
    inside them, hidden files and folders are no samples and no folder is read twice
    (:func:`_visible_samples`). Built on first use (torchvision's import takes about a second)
    and kept as this module's ``_VisibleImageFolder``."""
    cls = globals().get("_VisibleImageFolder")
    if cls is None:
        from torchvision.datasets import ImageFolder

        class _VisibleImageFolder(ImageFolder):
            def find_classes(self, directory):
                classes = sorted(e.name for e in os.scandir(directory)
                                 if e.is_dir() and not _hidden(e.name))
                if not classes:
                    raise FileNotFoundError(f"found no class folder in {directory}")
                return classes, {c: i for i, c in enumerate(classes)}

            make_dataset = staticmethod(_visible_samples)

        _VisibleImageFolder.__qualname__ = "_VisibleImageFolder"  # pickled by that name
        globals()["_VisibleImageFolder"] = cls = _VisibleImageFolder
    return cls


def __getattr__(name: str):
    """PEP 562: a DataLoader worker started by spawn unpickles the dataset's class by name."""
    if name == "_VisibleImageFolder":
        return _visible_image_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _image_folder(path: Path, transform, hint: str = ""):
    try:
        return _visible_image_folder()(str(path), transform=transform, loader=_load_image)
    except FileNotFoundError as e:
        raise ValueError(
            f"--data {path}: a class folder holds no images, or there are none ({e}); expected "
            f"one subfolder per class holding {', '.join(IMAGE_EXTENSIONS[:3])}... files, or "
            f"train/ and val/ folders laid out that way (hidden folders, named .* or __MACOSX, are "
            f"no class){hint}") from e


def _folder_set(path: Path, img_size: int, mean, std, bad_images: str = "error",
                warn: Callable = warnings.warn, data_config: Optional[dict] = None
                ) -> DataBundle:
    train_tf, test_tf = _transforms(img_size, mean, std, False, data_config)
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    # train/ alone is a class folder (bus/ train/ truck/): a split needs val/ or test/ too
    hint = ""
    if (path / "train").is_dir() and test_dir is None:
        hint = ("; note: train/ has no val/ or test/ beside it, so it was read as a class "
                "folder named train, not as a training split (for a split, add val/ or test/)")
    if (path / "train").is_dir() and test_dir is not None:
        train = _image_folder(path / "train", train_tf)
        test = _image_folder(test_dir, test_tf)
        _check_images(path, [train, test], bad_images, warn, test_dir.name)
        if train.classes != test.classes:
            raise ValueError(f"--data {path}: train/ and {test_dir.name}/ have different class "
                             f"folders ({train.classes} vs {test.classes})")
        classes = list(train.classes)
    else:  # one folder: hold out a fifth of every class
        full_train = _image_folder(path, train_tf, hint)
        full_test = _image_folder(path, test_tf, hint)
        _check_images(path, [full_train, full_test], bad_images, warn)
        labels = torch.tensor(full_train.targets)
        tr, te = _stratified_split(labels, 0.2, 0)
        if te.numel() == 0 or tr.numel() == 0:
            raise ValueError(f"--data {path}: too few images ({labels.numel()}) to hold out a "
                             "test split; add images or use train/ and val/ folders")
        in_test = set(labels[te].tolist())
        absent = [f"{full_train.classes[c]} ({int((labels == c).sum())} image"
                  f"{'s' if int((labels == c).sum()) != 1 else ''})"
                  for c in torch.unique(labels).tolist() if c not in in_test]
        if absent:
            warn(f"--data {path}: {len(absent)} class(es) have too few images to hold out a "
                 f"fifth for testing, so the test accuracy does not cover them: "
                 f"{', '.join(absent[:10])}; add images or use train/ and val/ folders")
        train, test = Subset(full_train, tr.tolist()), Subset(full_test, te.tolist())
        classes = list(full_train.classes)
    if len(classes) < 2:
        raise ValueError(f"--data {path}: found {len(classes)} class folder(s); a classifier "
                         f"needs at least 2{hint}")
    return DataBundle(str(path), train, test, len(classes), classes, tuple(mean), tuple(std))


def data_kind(data: str) -> str:
    """What ``--data`` names: ``"digits"`` (the built-in set), ``"torchvision"`` (one of
    :data:`TORCHVISION_SETS`) or ``"folder"`` (an ImageFolder path). Names match in any case;
    a folder of such a name is passed as a path (``./cifar10``).

    Raises:
        ValueError: when ``data`` is not a non-empty string.
    """
    if not isinstance(data, str) or not data:
        raise ValueError(f"--data must be a name or a directory, got {data!r}")
    if data.lower() == "digits":
        return "digits"
    return "torchvision" if data.lower() in TORCHVISION_SETS else "folder"


def build_data(data: str, img_size: int, mean: Sequence[float], std: Sequence[float],
               root: Optional[os.PathLike] = None, digits_shift: int = 0,
               bad_images: str = "error", warn: Callable = warnings.warn,
               data_config: Optional[dict] = None) -> DataBundle:
    """The train/test data named by ``--data``.

    Args:
        data: "digits" (built in, no network), one of :data:`TORCHVISION_SETS` (downloaded
            to ``root`` when online), or an ImageFolder directory (``DIR/train`` + ``DIR/val``
            or ``DIR/test``, or one folder of class subfolders of which a fifth is held out).
        img_size: side of the square model input.
        mean, std: the model's normalisation.
        root: download directory of torchvision sets; default :func:`default_data_root`.
        digits_shift: random-shift augmentation (pixels) of the digits training images.
        bad_images: ImageFolder files that cannot be read (every file is verified at
            start-up): "error" refuses the data naming them, "skip" leaves them out with a
            counted warning.
        warn: where warnings go (a callable taking the message).
        data_config: the model's timm data config (``models.model_data_config``):
            interpolation, crop_pct and crop_mode of the photo transforms.

    Raises:
        ValueError: for a path that does not exist, is not a directory, holds no images, or
            (with ``bad_images="error"``) holds unreadable images.
        DatasetUnavailableError: when a torchvision set cannot be downloaded (offline).
    """
    kind = data_kind(data)
    if kind != "folder" and Path(data).is_dir():
        warn(f"--data {data}: the {'built-in' if kind == 'digits' else 'torchvision'} set of "
             f"that name, not the folder {data}/ here; pass ./{data} for the folder")
    if kind == "digits":
        train, test = digits_split(DIGITS_TARGET_CLASSES, img_size, mean, std,
                                   max_shift=digits_shift)
        return DataBundle("digits", train, test, len(DIGITS_TARGET_CLASSES),
                          [str(c) for c in DIGITS_TARGET_CLASSES], tuple(mean), tuple(std))
    if kind == "torchvision":
        return _torchvision_set(data.lower(), Path(root or default_data_root()), img_size, mean,
                                std, data_config)
    path = Path(data).expanduser()
    if not path.exists():
        raise ValueError(f"--data {data}: no such directory; pass an ImageFolder directory or "
                         f"one of digits, {', '.join(TORCHVISION_SETS)}")
    if not path.is_dir():
        raise ValueError(f"--data {data}: not a directory; pass an ImageFolder directory or "
                         f"one of digits, {', '.join(TORCHVISION_SETS)}")
    return _folder_set(path, img_size, mean, std, bad_images, warn, data_config)
