"""The CIFAR-10 download path, with torchvision's dataset class swapped for a local stand-in
(the network is not reachable from tests); the folder writing and renaming are real."""

import numpy as np
import pytest
from PIL import Image

import pipeline.download as download

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class LocalCIFAR10:
    def __init__(self, root, train, download):
        self.class_to_idx = {name: i for i, name in enumerate(CIFAR_CLASSES)}
        rng = np.random.default_rng(0 if train else 1)
        n = 30 if train else 20
        self.items = [(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), i % 10) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __iter__(self):
        return iter(self.items)


class Offline:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz")


def test_download_writes_four_classes_with_ship_renamed_boat(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CIFAR10", LocalCIFAR10)
    out = download.download_cifar4(tmp_path / "cifar4")
    for split, per_class in (("train", 3), ("test", 2)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == ["bird", "boat", "cat", "dog"]
        for name in folders:
            assert len(list((out / split / name).glob("*.png"))) == per_class


def test_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("torchvision.datasets.CIFAR10", Offline)
    with pytest.raises(download.DataError, match="pass --data with a local folder"):
        download.download_cifar4(tmp_path / "cifar4")
