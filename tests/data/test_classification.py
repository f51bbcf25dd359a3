"""Reading classification data: folder trees, the pickle release, the cache, bad input."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mixlab.data.classification import DataError, holdout, load_dataset


def test_folder_tree_round_trip(make_folder_dataset):
    root = make_folder_dataset(n_classes=3, per_class=(8, 4), size=16)
    d = load_dataset("folder", root, val_split=0.0, verbose=False)
    assert d.classes == ["class0", "class1", "class2"]
    assert d.train.images.shape == (24, 3, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (12, 3, 16, 16)
    assert d.train.labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8
    # pixels equal what PIL reads from the file
    ref = np.array(Image.open(root / "train" / "class1" / "0003.png").convert("RGB"))
    assert torch.equal(d.train.images[8 + 3], torch.from_numpy(ref).permute(2, 0, 1))


def test_cifar_name_finds_a_folder_tree_under_the_root(make_folder_dataset, tmp_path):
    make_folder_dataset(n_classes=10, per_class=(2, 1), size=32, root=tmp_path / "data" / "cifar10", fmt="jpg")
    d = load_dataset("cifar10", tmp_path / "data", val_split=0.0, verbose=False)
    assert len(d.train) == 20 and d.image_size == (32, 32)


@pytest.mark.parametrize("kind,classes", [("cifar10", 10), ("cifar100", 100)])
def test_pickle_release(make_cifar_pickle, kind, classes):
    root = make_cifar_pickle(kind, n_train=50, n_test=20)
    d = load_dataset(kind, root, val_split=0.0, verbose=False)
    assert d.num_classes == classes and len(d.train) == 50 and len(d.test) == 20
    assert d.train.images.shape[1:] == (3, 32, 32)


def test_first_or_random_holds_out_the_release_order_first_and_a_folder_tree_at_random(make_cifar_pickle,
                                                                                        make_folder_dataset, tmp_path):
    root = make_cifar_pickle("cifar10", n_train=100, n_test=20)
    whole = load_dataset("cifar10", root, val_split=0.0, verbose=False)
    d = load_dataset("cifar10", root, val_split=0.1, val_holdout="first_or_random", verbose=False)
    assert d.release_order and d.val_holdout == "first"
    assert torch.equal(d.val.images, whole.train.images[:10]) and torch.equal(d.train.images, whole.train.images[10:])
    tree = make_folder_dataset(n_classes=4, per_class=(10, 2), size=8, root=tmp_path / "tree")
    f = load_dataset("folder", tree, val_split=0.25, val_holdout="first_or_random", verbose=False)
    seeded = load_dataset("folder", tree, val_split=0.25, val_holdout="random", verbose=False)
    assert not f.release_order and f.val_holdout == "random"
    assert torch.equal(f.val.labels, seeded.val.labels) and len(set(f.val.labels.tolist())) > 1
    with pytest.raises(DataError, match="sorted by class"):  # "first" on a class-sorted tree: one class
        load_dataset("folder", tree, val_split=0.25, val_holdout="first", verbose=False)


def test_pickle_release_written_by_python3_with_protocol_2_loads(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = {name: rng.integers(0, 256, (10, 3072), dtype=np.uint8) for name in
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    for name, x in data.items():
        with open(folder / name, "wb") as f:  # bytes keys and values: _codecs.encode in protocol 2
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": list(range(10)),
                         b"empty": b""}, f, protocol=2)  # an empty bytes object: __builtin__.bytes
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)
    d = load_dataset("cifar10", tmp_path, val_split=0.0, verbose=False)
    assert d.classes == [f"c{i}" for i in range(10)]
    assert torch.equal(d.test.images, torch.from_numpy(data["test_batch"].reshape(10, 3, 32, 32)))
    assert torch.equal(d.train.images[10:20], torch.from_numpy(data["data_batch_2"].reshape(10, 3, 32, 32)))


def test_pickle_with_another_codec_is_refused(tmp_path):
    import pickle

    from mixlab.data.classification import _read_pickle

    # _codecs.encode(text, "hex") doubles its input: nested, a few hundred bytes ask for gigabytes
    bomb = (b"\x80\x02c_codecs\nencode\nq\x00X\x02\x00\x00\x00abq\x01X\x03\x00\x00\x00hexq\x02\x86q\x03"
            b"Rq\x04.")
    (tmp_path / "f").write_bytes(bomb)
    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        _read_pickle(tmp_path / "f")
    (tmp_path / "g").write_bytes(pickle.dumps(b"\x00\xffok", protocol=2))  # the form Python 3 writes
    assert _read_pickle(tmp_path / "g") == b"\x00\xffok"


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_dataset("cifar10", tmp_path, verbose=False)


def test_env_var_and_missing_message(make_folder_dataset, tmp_path, monkeypatch):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "nowhere", verbose=False)
    assert "nowhere" in str(e.value) and "--data" in str(e.value) and "MIXLAB_DATA" in str(e.value)
    root = make_folder_dataset(n_classes=10, per_class=(1, 1), size=8, root=tmp_path / "env" / "cifar10")
    monkeypatch.setenv("MIXLAB_DATA", str(root.parent))
    assert len(load_dataset("cifar10", None, val_split=0.0, verbose=False).train) == 10


def test_cache_is_used_then_rebuilt_when_the_source_changes(make_folder_dataset, tmp_path):
    root = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    load_dataset("folder", root, val_split=0.0, verbose=False)
    cached = list((tmp_path / "cache" / "datasets").glob("*.safetensors"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    d = load_dataset("folder", root, val_split=0.0, verbose=False)
    assert cached[0].stat().st_mtime_ns == mtime and len(d.train) == 8  # read, not rewritten
    time.sleep(0.01)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "class0" / "extra.png")
    d = load_dataset("folder", root, val_split=0.0, verbose=False)
    assert len(d.train) == 9  # a new file: decoded again


def test_bad_image_error_or_counted_skip(make_folder_dataset):
    root = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    (root / "train" / "class1" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="notes.txt.*on_bad_image=skip"):
        load_dataset("folder", root, verbose=False)
    d = load_dataset("folder", root, val_split=0.0, on_bad_image="skip", verbose=False)
    assert len(d.train) == 8 and len(d.skipped) == 1 and "notes.txt" in d.skipped[0]


def test_wrong_size_image(make_folder_dataset):
    root = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(root / "train" / "class1" / "odd.png")
    with pytest.raises(DataError, match="odd.png.*8x9.*data.resize"):
        load_dataset("folder", root, verbose=False)
    d = load_dataset("folder", root, val_split=0.0, resize=8, verbose=False)
    assert len(d.train) == 9


def test_class_missing_from_test(make_folder_dataset):
    import shutil

    root = make_folder_dataset(n_classes=3, per_class=(2, 2), size=8)
    shutil.rmtree(root / "test" / "class2")
    with pytest.raises(DataError, match="class2.*missing"):
        load_dataset("folder", root, verbose=False)


def test_holdout_is_seeded_disjoint_and_complete():
    from mixlab.data.classification import Split

    s = Split(torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1), torch.arange(100) % 10)
    ids = lambda split: split.images.flatten().tolist()  # noqa: E731  image i holds the value i
    tr, va = holdout(s, 0.1, seed=3)
    tr2, va2 = holdout(s, 0.1, seed=3)
    assert ids(va) == ids(va2) and len(va) == 10 and len(tr) == 90
    assert sorted(ids(tr) + ids(va)) == list(range(100))
    assert ids(holdout(s, 0.1, seed=4)[1]) != ids(va)
    _, first = holdout(s, 0.1, seed=3, mode="first")
    assert ids(first) == list(range(10))
    assert holdout(s, 0.0, seed=0)[1] is None


def test_first_holdout_of_a_class_sorted_source_is_refused():
    from mixlab.data.classification import Split

    s = Split(torch.zeros(20, 1, 1, 1, dtype=torch.uint8), torch.tensor([0] * 10 + [1] * 10))
    with pytest.raises(DataError, match="sorted by class"):
        holdout(s, 0.25, seed=0, mode="first")


def test_val_holdout_test_trains_on_all_and_validates_on_the_test_set(make_folder_dataset):
    root = make_folder_dataset(n_classes=3, per_class=(8, 4), size=8)
    d = load_dataset("folder", root, val_split=0.25, val_holdout="test", verbose=False)
    assert len(d.train) == 24 and len(d.test) == 12 and d.val is d.test
    with pytest.raises(DataError, match="val_holdout"):
        load_dataset("folder", root, val_holdout="tset", verbose=False)


# ----------------------------------------------------------------------------- nothing silently wrong

def test_16_bit_images_are_scaled_not_clipped(make_folder_dataset):
    root = make_folder_dataset(n_classes=2, per_class=(2, 1), size=8)
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000
    Image.fromarray(wide).save(root / "train" / "class0" / "0000.png")  # Pillow reads it as I;16
    assert Image.open(root / "train" / "class0" / "0000.png").mode == "I;16"
    d = load_dataset("folder", root, val_split=0.0, verbose=False)
    expected = torch.from_numpy(np.rint(wide / 65535 * 255).astype(np.uint8))
    for channel in range(3):  # grey: the same on each channel
        assert torch.equal(d.train.images[0, channel], expected)
    assert (d.train.images[0] == 255).float().mean() < 0.05  # clipping made 98% of it 255


def test_an_empty_class_folder_is_left_out_saying_so(make_folder_dataset, capsys):
    root = make_folder_dataset(n_classes=3, per_class=(2, 1), size=8)
    for split in ("train", "test"):
        (root / split / "empty").mkdir()
    d = load_dataset("folder", root, val_split=0.0, verbose=True)
    assert d.classes == ["class0", "class1", "class2"] and d.num_classes == 3
    assert "left out empty class folder(s) empty" in capsys.readouterr().out
    again = load_dataset("folder", root, val_split=0.0, verbose=True)  # from the cache: said again
    assert again.classes == d.classes and "left out empty class folder(s) empty" in capsys.readouterr().out


def test_a_class_with_test_images_but_nothing_to_train_on_is_refused(make_folder_dataset):
    root = make_folder_dataset(n_classes=3, per_class=(2, 1), size=8)
    for f in (root / "train" / "class1").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class folder .*train.class1 is empty but .*test.class1 has images"):
        load_dataset("folder", root, verbose=False)


def test_a_class_whose_every_training_image_is_skipped_is_refused(make_folder_dataset):
    root = make_folder_dataset(n_classes=2, per_class=(2, 1), size=8)
    for f in (root / "train" / "class1").iterdir():
        f.write_text("not an image")
    with pytest.raises(DataError, match="every training image of class.*class1.*skipped"):
        load_dataset("folder", root, on_bad_image="skip", verbose=False)


def test_the_cache_honours_on_bad_image(make_folder_dataset):
    root = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    (root / "train" / "class1" / "notes.txt").write_text("not an image")
    d = load_dataset("folder", root, val_split=0.0, on_bad_image="skip", verbose=False)
    assert len(d.skipped) == 1
    # the cache built while skipping does not make a later run that asks for errors skip too
    with pytest.raises(DataError, match="notes.txt.*on_bad_image=skip"):
        load_dataset("folder", root, verbose=False)
    assert len(load_dataset("folder", root, val_split=0.0, on_bad_image="skip", verbose=False).train) == 8


def test_a_damaged_cache_is_rebuilt_saying_so(make_folder_dataset, tmp_path, capsys):
    root = make_folder_dataset(n_classes=2, per_class=(4, 2), size=8)
    first = load_dataset("folder", root, val_split=0.0, verbose=False)
    [cache] = (tmp_path / "cache" / "datasets").glob("*.safetensors")
    cache.write_bytes(cache.read_bytes()[:50])
    d = load_dataset("folder", root, val_split=0.0, verbose=True)
    out = capsys.readouterr().out
    assert f"the cache {cache} is damaged" in out and "decoding the data again" in out
    assert torch.equal(d.train.images, first.train.images)
    assert load_dataset("folder", root, val_split=0.0, verbose=True).train.images.shape == first.train.images.shape
    again = capsys.readouterr().out
    assert "is damaged" not in again and "(cache in" in again  # rebuilt whole, then read
