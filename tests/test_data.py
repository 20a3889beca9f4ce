import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import (
    DataError, ImageFolderDataModule, TensorBatches, augment_batch, load_image_folder, resolve_data_dir,
    split_indices,
)
from pipeline.runtime import imaging
from pipeline.runtime.imaging import ImageDecodeError, decode_image
from toy_data import make_image_folder


def test_split_is_seeded_stratified_disjoint_and_complete():
    labels = torch.arange(1000) % 4
    train_a, val_a = split_indices(labels, 0.1, seed=7)
    train_b, val_b = split_indices(labels, 0.1, seed=7)
    _, val_c = split_indices(labels, 0.1, seed=8)
    assert torch.equal(val_a, val_b) and torch.equal(train_a, train_b)
    assert not torch.equal(val_a, val_c)
    assert torch.bincount(labels[val_a]).tolist() == [25, 25, 25, 25]
    assert sorted(torch.cat([train_a, val_a]).tolist()) == list(range(1000))
    _, tiny_val = split_indices(torch.tensor([0, 0, 1, 1, 1]), 0.01, seed=0)
    assert sorted(torch.tensor([0, 0, 1, 1, 1])[tiny_val].tolist()) == [0, 1]


def test_folder_loads_with_sorted_classes_and_cache(tmp_path):
    root = make_image_folder(tmp_path / "imgs", per_class=5, classes=("dog", "cat", "zebra"))
    first = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert first.classes == ["cat", "dog", "zebra"]
    assert first.images.shape == (15, 3, 32, 32) and first.images.dtype == torch.uint8
    assert np.bincount(first.labels.numpy()).tolist() == [5, 5, 5]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, first.images) and again.fingerprint == first.fingerprint
    make_image_folder(tmp_path / "imgs", per_class=6, classes=("cat",), seed=3)  # adds cat/005
    changed = load_image_folder(root, cache_dir=tmp_path / "cache")
    assert changed.fingerprint != first.fingerprint and len(changed.labels) == 16


def test_train_and_test_layout(tmp_path):
    make_image_folder(tmp_path / "d" / "train", per_class=4)
    make_image_folder(tmp_path / "d" / "test", per_class=2, seed=1)
    train, test = resolve_data_dir(tmp_path / "d")
    assert train.name == "train" and test.name == "test"
    dm = ImageFolderDataModule(str(tmp_path / "d"), val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    dm.prepare()
    assert len(dm.test_labels) == 8 and len(dm.train_labels) + len(dm.val_labels) == 16


def test_missing_folder_is_one_sentence(tmp_path):
    with pytest.raises(DataError, match=r"Data folder '.*nowhere' does not exist\."):
        resolve_data_dir(tmp_path / "nowhere")


def test_fewer_than_two_classes(tmp_path):
    make_image_folder(tmp_path / "one", per_class=3, classes=("cat",))
    with pytest.raises(DataError, match="needs at least 2"):
        load_image_folder(tmp_path / "one", cache_dir=tmp_path / "c")


def test_empty_class_is_named(tmp_path):
    make_image_folder(tmp_path / "d", per_class=3, classes=("cat", "dog"))
    (tmp_path / "d" / "bird").mkdir()
    with pytest.raises(DataError, match=r"Class folder '.*bird' holds no images"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "c")


def test_corrupt_image_names_the_file(tmp_path):
    make_image_folder(tmp_path / "d", per_class=3, classes=("cat", "dog"))
    (tmp_path / "d" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg' could not be decoded"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "c")


def test_skip_leaves_broken_files_out_but_a_damaged_folder_still_stops(tmp_path, capsys):
    make_image_folder(tmp_path / "d", per_class=60, classes=("cat", "dog"))
    (tmp_path / "d" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = load_image_folder(tmp_path / "d", cache_dir=tmp_path / "c", on_bad_image="skip")
    assert len(images.labels) == 120 and images.skipped == ["dog/broken.jpg"]
    assert "skipped 1 of 121 images" in capsys.readouterr().out
    # The cache remembers what it left out: a later run with the default still refuses the folder.
    with pytest.raises(DataError, match=r"broken\.jpg' could not be decoded .*on_bad_image=skip"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "c")
    for i in range(2):  # 3 of 123 files is more than 1%
        (tmp_path / "d" / "cat" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"3 of 123 images in .* do not decode, more than 1%"):
        load_image_folder(tmp_path / "d", cache_dir=tmp_path / "c", on_bad_image="skip")


def test_class_too_small_to_validate_is_named(tmp_path):
    make_image_folder(tmp_path / "d", per_class=20, classes=("cat", "dog"))
    make_image_folder(tmp_path / "d", per_class=1, classes=("bird",))
    dm = ImageFolderDataModule(str(tmp_path / "d"), val_fraction=0.05, test_fraction=0.0, seed=0,
                               cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"Class 'bird' .* has 1 image\(s\); it needs at least 2"):
        dm.prepare()
    held_out = ImageFolderDataModule(str(tmp_path / "d"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="it needs at least 3 .*validation and test"):
        held_out.prepare()


def test_augment_keeps_shape_and_content():
    torch.manual_seed(0)
    images = torch.rand(64, 3, 32, 32)
    out = augment_batch(images, padding=4, flip=True)
    assert out.shape == images.shape
    same = augment_batch(images, padding=0, flip=False)
    assert torch.equal(same, images)
    flipped_only = augment_batch(images, padding=0, flip=True)
    for a, b in zip(images, flipped_only):
        assert torch.equal(a, b) or torch.equal(a.flip(2), b)
    # a crop shifts the picture: every output pixel is an input pixel or zero padding
    crop = augment_batch(images[:1], padding=4, flip=False)[0]
    assert set(crop.flatten().tolist()) <= set(images[0].flatten().tolist()) | {0.0}


def test_batches_cover_every_index_and_shard_disjointly():
    images = torch.arange(100).view(100, 1, 1, 1).expand(100, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(100)
    one = TensorBatches(images, labels, 16, shuffle=True, seed=1)
    seen = torch.cat([y for _, y in one])
    assert sorted(seen.tolist()) == list(range(100)) and len(one) == 7
    second_epoch = torch.cat([y for _, y in one])
    assert not torch.equal(seen, second_epoch)
    ranks = [torch.cat([y for _, y in TensorBatches(images, labels, 10, True, seed=1, rank=r, world_size=2)])
             for r in (0, 1)]
    assert set(ranks[0].tolist()).isdisjoint(ranks[1].tolist())
    assert len(ranks[0]) == len(ranks[1]) == 50


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def test_decode_handles_modes_and_orientation():
    wide = Image.new("RGB", (64, 32), (255, 0, 0))
    wide.paste((0, 0, 255), (32, 0, 64, 32))  # right half blue
    assert decode_image(_png(wide), 32).shape == (3, 32, 32)
    exif = Image.Exif()
    exif[0x0112] = 3  # rotated 180 degrees: the blue half must end up on the left
    rotated = decode_image(_png(wide, format="JPEG", exif=exif.tobytes()), 32)
    assert rotated[2, 16, 2] > 200 and rotated[0, 16, 29] > 200
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert decode_image(_png(rgba), 8).min() == 255  # transparent becomes white
    sixteen = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert decode_image(_png(sixteen), 8).min() == 255
    for mode in ("L", "P", "CMYK"):
        data = _png(Image.new(mode, (10, 10)), format="JPEG" if mode == "CMYK" else "PNG")
        assert decode_image(data, 8).shape == (3, 8, 8)


@pytest.mark.parametrize(
    "data, message",
    [(b"", "empty"), (b"hello world", "not a readable image"), (b"<svg xmlns='x'/>", "not a readable image")],
)
def test_decode_errors_are_sentences(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, 32, name="upload.jpg")


def test_decode_refuses_huge_images():
    big = _png(Image.new("L", (5000, 5000)))
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_image(big, 32, max_pixels=1_000_000)


def test_truncated_png_is_an_error():
    data = _png(Image.effect_noise((64, 64), 50))
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2], 32)


def _jpeg_variants():
    rng = np.random.default_rng(0)
    for width, height in ((32, 32), (7, 5), (33, 47), (127, 300), (130, 90)):
        pixels = (np.linspace(0, 255, width)[None, :, None] * 0.6 + rng.integers(0, 100, (height, width, 3)))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        for subsampling in (0, 1, 2):
            for progressive in (False, True):
                yield f"{width}x{height} sub{subsampling} prog{progressive}", _png(
                    image, format="JPEG", quality=90, subsampling=subsampling, progressive=progressive)
        yield f"{width}x{height} grey", _png(image.convert("L"), format="JPEG", quality=80)


def test_small_jpegs_take_the_fast_path_with_pillows_pixels(monkeypatch):
    fast = {name: imaging._decode_small_jpeg(data, 32, 10**6) for name, data in _jpeg_variants()}
    assert all(array is not None for array in fast.values()), [n for n, a in fast.items() if a is None]
    monkeypatch.setattr(imaging, "simplejpeg", None)  # Pillow only
    for name, data in _jpeg_variants():
        assert np.array_equal(fast[name], decode_image(data, 32)), name


def test_jpegs_that_could_decode_differently_go_through_pillow():
    image = Image.effect_noise((40, 40), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    refused = {"exif": _png(image, format="JPEG", exif=exif.tobytes()),
               "cmyk": _png(image.convert("CMYK"), format="JPEG"),
               "big enough for draft()": _png(image.resize((300, 300)), format="JPEG"),
               "truncated": _png(image, format="JPEG")[:300],
               "png": _png(image)}
    for name, data in refused.items():
        assert imaging._decode_small_jpeg(data, 32, 10**6) is None, name
    assert decode_image(refused["exif"], 32).shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match="could not be decoded|not a readable"):
        decode_image(refused["truncated"], 32)
