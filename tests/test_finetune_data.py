"""bsr-finetune image folders: what is a sample, a class and a split, and how pixels are read
(hidden entries and symbolic-link loops, a class named train, --bad-images skip emptying a
val/ class, EXIF orientation, float and 32-bit integer TIFFs)."""
import json
import os

import numpy as np
import pytest

from bsr_kernels.finetune import data

from test_finetune_reliability import _folder_args, _run, _write_image_folder


def _build(path, **kw):
    warned = []
    bundle = data.build_data(str(path), 16, (0.5,) * 3, (0.5,) * 3, warn=warned.append, **kw)
    return bundle, warned


def _files(subset):
    """Real paths of the samples of a Subset of an ImageFolder."""
    return [os.path.realpath(subset.dataset.samples[i][0]) for i in subset.indices]


# --- A: hidden entries and symbolic-link loops inside class folders -----------------------

def test_hidden_files_and_folders_inside_class_folders_are_no_samples(tmp_path):
    """cat/.thumbs/x.png trained as cat, macOS's AppleDouble cat/._1.png stopped the run as
    unreadable, and __MACOSX/ became a class (with --bad-images skip: a class with no image)."""
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 6, "dog": 6})
    (pics / "cat" / ".thumbs").mkdir()
    (pics / "cat" / "0.png").rename(pics / "cat" / ".thumbs" / "x.png")   # a real image
    (pics / "cat" / "._1.png").write_bytes(b"\x00\x05\x16\x07AppleDouble resource fork")
    (pics / "__MACOSX" / "cat").mkdir(parents=True)
    (pics / "__MACOSX" / "cat" / "._2.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    ds = data._image_folder(pics, None)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 11 and [c for _, c in ds.samples] == [0] * 5 + [1] * 6
    assert not [f for f, _ in ds.samples if "/." in f or "__MACOSX" in f], ds.samples
    for bad in ("error", "skip"):
        bundle, warned = _build(pics, bad_images=bad)
        assert bundle.classes == ["cat", "dog"] and len(bundle.train) + len(bundle.test) == 11
        assert warned == []


def _link(target, link):
    try:
        os.symlink(target, link)
    except (OSError, NotImplementedError):
        pytest.skip("no symbolic links here")


def test_a_symlink_loop_in_a_class_folder_is_followed_once(tmp_path):
    """cat/loop -> .. multiplied the images (6 became 246 samples) and put copies of one file
    in both the training and the test part; a link to a folder outside is still followed."""
    pics, extra = tmp_path / "pics", tmp_path / "extra"
    _write_image_folder(pics, {"cat": 5, "dog": 5})
    _write_image_folder(extra, {"more": 3})
    _link("..", pics / "cat" / "loop")
    _link(extra / "more", pics / "dog" / "more")
    _link(pics / "dog", pics / "dog" / "again")
    ds = data._image_folder(pics, None)
    assert [c for _, c in ds.samples] == [0] * 5 + [1] * 8
    real = [os.path.realpath(f) for f, _ in ds.samples]
    assert len(set(real)) == len(real) == 13
    bundle, _ = _build(pics)
    train, test = _files(bundle.train), _files(bundle.test)
    assert len(train) + len(test) == 13 and not set(train) & set(test)


def test_a_folder_reached_by_several_links_is_read_once_whatever_the_listing_order(
        tmp_path, monkeypatch):
    """extra/more linked from cat/ twice and from dog/ once: its images are samples once, under
    the first link in name order (cat/a), however the file system lists the folders."""
    pics, extra = tmp_path / "pics", tmp_path / "extra"
    _write_image_folder(pics, {"cat": 4, "dog": 4})
    _write_image_folder(extra, {"more": 3})
    for link in ("cat/b", "cat/a", "dog/c"):
        _link(extra / "more", pics / link)
    want = ([(f"cat/{i}.png", 0) for i in range(4)] + [(f"cat/a/{i}.png", 0) for i in range(3)]
            + [(f"dog/{i}.png", 1) for i in range(4)])

    def samples():
        return [(os.path.relpath(f, pics), c) for f, c in data._image_folder(pics, None).samples]

    assert samples() == want
    walk = os.walk

    def listed_backwards(*args, **kwargs):   # another file system's listing order
        for root, dirs, files in walk(*args, **kwargs):
            dirs.reverse()
            files.reverse()
            yield root, dirs, files

    monkeypatch.setattr(os, "walk", listed_backwards)
    assert samples() == want


def test_a_link_to_a_folder_above_the_data_is_a_loop(tmp_path):
    """cat/up -> the folder holding the data folder: following it would read the data's
    neighbours (other/) as cat images; it is left out like a link to the data folder."""
    pics = tmp_path / "data" / "pics"
    _write_image_folder(pics, {"cat": 3, "dog": 3})
    _write_image_folder(tmp_path / "other", {"x": 2})
    _link(tmp_path, pics / "cat" / "up")
    _link(tmp_path / "data", pics / "dog" / "up")
    ds = data._image_folder(pics, None)
    assert [(os.path.relpath(f, pics), c) for f, c in ds.samples] == (
        [(f"cat/{i}.png", 0) for i in range(3)] + [(f"dog/{i}.png", 1) for i in range(3)])


def test_samples_are_in_torchvisions_order(tmp_path):
    """Without hidden entries or links, the samples are torchvision's, in its order: folders
    sorted by path (cat/a, cat/a-b, cat/a/x), not visited depth first."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 5, "dog": 2})
    for i, sub in enumerate(("a", "a/x", "a-b", "a-b/y"), 1):
        (pics / "cat" / sub).mkdir()
        (pics / "cat" / f"{i}.png").rename(pics / "cat" / sub / f"{i}.png")
    ds = data._image_folder(pics, None)
    assert ds.samples == make_dataset(str(pics), ds.class_to_idx, extensions=IMG_EXTENSIONS)
    assert [os.path.relpath(f, pics) for f, _ in ds.samples[:5]] == [
        "cat/0.png", "cat/a/1.png", "cat/a-b/3.png", "cat/a-b/y/4.png", "cat/a/x/2.png"]


# --- B: a class folder named train ----------------------------------------------------------

def test_a_class_folder_named_train_is_a_class_not_a_split(tmp_path, capsys):
    """--data with bus/ train/ truck/ stopped with 'found train/ but neither val/ nor test/'."""
    pics, out = tmp_path / "vehicles", tmp_path / "run"
    _write_image_folder(pics, {"bus": 6, "train": 6, "truck": 6})
    rc, _, err = _run(_folder_args(pics, out), capsys)
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_classes"] == 3, summary
    bundle, _ = _build(pics)
    assert bundle.classes == ["bus", "train", "truck"]
    assert len(bundle.train) == 15 and len(bundle.test) == 3


def test_train_alone_names_the_ambiguity(tmp_path, capsys):
    """train/{cat,dog} without val/: one class named train, and the error says why."""
    pics = tmp_path / "pics"
    _write_image_folder(pics / "train", {"cat": 4, "dog": 4})
    rc, _, err = _run(_folder_args(pics), capsys)
    assert rc == 2 and "found 1 class folder(s)" in err, err
    assert "read as a class folder named train" in err and "add val/ or test/" in err, err
    (pics / "train" / "cat" / "0.png").rename(pics / "train" / "0.png")   # a split: refused
    (pics / "val" / "cat").mkdir(parents=True)
    (pics / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        _build(pics)


def test_a_split_is_train_with_val_or_test_holding_the_same_classes(tmp_path):
    """train/ with test/ is a split as train/ with val/ is (val/ is taken when both are
    there); the two must hold the same class folders. One folder too small to hold out a
    fifth of any class is refused rather than tested on nothing."""
    pics = tmp_path / "pics"
    _write_image_folder(pics / "train", {"cat": 4, "dog": 4})
    _write_image_folder(pics / "test", {"cat": 2, "dog": 2})
    bundle, _ = _build(pics)
    assert bundle.classes == ["cat", "dog"] and (len(bundle.train), len(bundle.test)) == (8, 4)
    _write_image_folder(pics / "val", {"cat": 1, "dog": 1})
    assert len(_build(pics)[0].test) == 2
    _write_image_folder(pics / "val", {"bird": 1})
    with pytest.raises(ValueError, match=r"train/ and val/ have different class folders "
                                         r"\(\['cat', 'dog'\] vs \['bird', 'cat', 'dog'\]\)"):
        _build(pics)
    tiny = tmp_path / "tiny"
    _write_image_folder(tiny, {"cat": 1, "dog": 2})      # round(0.2 * 2) = 0 of each class
    with pytest.raises(ValueError, match=r"too few images \(3\) to hold out a test split"):
        _build(tiny)


def test_class_folders_named_val_or_test_without_train_are_classes(tmp_path):
    """val/ or test/ is a split only beside train/; without it they are class folders of one
    folder, a fifth of each held out."""
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 5, "test": 5, "val": 5})
    bundle, warned = _build(pics)
    assert bundle.classes == ["cat", "test", "val"] and warned == []
    assert (len(bundle.train), len(bundle.test)) == (12, 3)


# --- C: --bad-images skip emptying a class of val/ ------------------------------------------

def test_skip_that_empties_a_val_class_is_refused_naming_class_and_split(tmp_path, capsys):
    """val/dog holding only an unreadable file: the run reported the accuracy over cat alone,
    while an empty val/dog folder is refused."""
    pics = tmp_path / "pics"
    _write_image_folder(pics / "train", {"cat": 6, "dog": 6})
    _write_image_folder(pics / "val", {"cat": 3, "dog": 1})
    (pics / "val" / "dog" / "0.png").write_bytes(b"not an image")
    rc, _, err = _run(_folder_args(pics) + ["--bad-images", "skip"], capsys)
    assert rc == 2, err
    assert "class folder(s) dog of val/ with no readable image" in err, err
    assert "test accuracy would not cover" in err
    _write_image_folder(pics / "val" / "dog" / "good", {"1": 1})   # one readable image: runs
    rc, _, err = _run(_folder_args(pics) + ["--bad-images", "skip"], capsys)
    assert rc == 0 and "skipped 1 of 17 image files" in err, err


# --- D: EXIF orientation, float and 32-bit integer images -----------------------------------

def test_exif_orientation_is_applied(tmp_path):
    """A 20 x 10 JPEG tagged orientation 6 (shown turned 90 degrees clockwise) loaded as
    stored, sideways."""
    from PIL import Image
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = 255                                # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.jpg", exif=exif.tobytes(), quality=95)
    rgb = np.asarray(data._load_image(str(tmp_path / "turned.jpg"))).astype(int)
    assert rgb.shape == (20, 10, 3)                # as displayed: 10 wide, 20 high
    assert rgb[:8].min() > 200 and rgb[12:].max() < 50   # the left half is now on top
    Image.fromarray(a).save(tmp_path / "plain.jpg", quality=95)   # no tag: unchanged
    assert np.asarray(data._load_image(str(tmp_path / "plain.jpg"))).shape == (10, 20, 3)


def test_float_and_32_bit_integer_tiffs_are_refused_naming_the_file(tmp_path):
    """A float TIFF of 0..1 loaded all black, a 32-bit integer one of 0..252 all ones, both
    without an error; they have no defined 8-bit range, so they are refused, at start-up."""
    from PIL import Image
    pics = tmp_path / "pics"
    _write_image_folder(pics, {"cat": 5, "dog": 5})
    f = (np.arange(64, dtype=np.float32).reshape(8, 8) / 63)
    Image.fromarray(f, "F").save(pics / "cat" / "float.tif")
    Image.fromarray((np.arange(64, dtype=np.int32).reshape(8, 8) * 4), "I").save(
        pics / "dog" / "int32.tif")
    for name, mode in (("cat/float.tif", "mode F"), ("dog/int32.tif", "mode I")):
        with pytest.raises(ValueError, match=f"{name}.*{mode}.*no defined range"):
            data._load_image(str(pics / name))
        assert mode in data._unreadable(str(pics / name))
    with pytest.raises(ValueError, match="2 of 12 image files cannot be read") as e:
        _build(pics)
    assert "float.tif" in str(e.value) and "int32.tif" in str(e.value)
    bundle, warned = _build(pics, bad_images="skip")
    assert len(bundle.train) + len(bundle.test) == 10 and "skipped 2 of 12" in warned[0]


def test_sixteen_bit_mode_i_images_are_still_scaled(tmp_path):
    """Mode I is 16-bit (0..65535) in a PGM of maxval 65535 and in a PNG opened by older
    Pillow: scaled by 1/257, not refused."""
    from PIL import Image
    g = (np.arange(64, dtype=np.int32).reshape(8, 8) * 1000)
    Image.fromarray(g, "I").save(tmp_path / "deep.pgm")
    assert Image.open(tmp_path / "deep.pgm").mode == "I"
    want = np.rint(g / 257.0).astype(np.uint8)
    assert (np.asarray(data._load_image(str(tmp_path / "deep.pgm")))[..., 0] == want).all()
    assert data._unreadable(str(tmp_path / "deep.pgm")) is None
    old_png = Image.fromarray(g, "I")
    old_png.format = "PNG"
    assert (np.asarray(data._to_rgb(old_png))[..., 1] == want).all()
    old_png.format = "TIFF"
    with pytest.raises(ValueError, match="mode I"):
        data._to_rgb(old_png)
