"""Several training sources in one run, and outlier exposure: splits per source, held-out outlier classes,
the figures a user reads per source, and a real run that learns "none of these"."""

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.data import (ImageFolderDataModule, OutlierBatches, TensorBatches, load_outlier_folder, outlier_group,
                           parse_sources, weighted_order)
from pipeline.errors import DataError
from pipeline.module import outlier_loss
from toy_data import make_image_folder


def make_outliers(root: Path, per_class: int = 24, kinds: int = 6, seed: int = 0) -> Path:
    """Out-of-scope images of ``kinds`` classes, named like outliers-train (``<class>_<n>.png``):
    stripes, checkers and blotches at several scales, none of them a toy class's lone shape."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:32, 0:32]
    for kind in range(kinds):
        for i in range(per_class):
            period = 2 + kind + int(rng.integers(0, 3))
            if kind % 3 == 0:
                pattern = (x + int(rng.integers(0, 8))) // period % 2
            elif kind % 3 == 1:
                pattern = (x // period + y // period) % 2
            else:
                pattern = rng.random((32 // period + 1, 32 // period + 1)).repeat(period, 0).repeat(period, 1)[:32, :32]
            colour = rng.integers(60, 256, 3)
            image = (pattern[..., None] * colour + rng.normal(0, 10, (32, 32, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / f"texture{kind}_{i:03d}.png")
    return root


def test_sources_are_named_after_their_folders_and_take_weights(tmp_path):
    sources = parse_sources(f"{tmp_path}/cifar4/train,{tmp_path}/photos-train:2.5,{tmp_path}/b/photos-train")
    assert [s.name for s in sources] == ["cifar4", "photos-train", "photos-train-2"]
    assert [s.weight for s in sources] == [1.0, 2.5, 1.0]
    assert parse_sources([{"path": "x/a", "weight": 0.5}])[0].weight == 0.5
    with pytest.raises(DataError, match="weight"):
        parse_sources("a:0")


def test_a_source_can_leave_out_files_by_name(tmp_path):
    """Leave-one-species-out: a species' files (named <wnid>_<n>) are left out of every split of that source."""
    root = make_image_folder(tmp_path / "photos", per_class=20, seed=3)
    for path in sorted((root / "bird").iterdir())[:8]:
        path.rename(path.with_name(f"goose_{path.name}"))
    (source,) = parse_sources([{"path": str(root), "exclude": "goose_*"}])
    assert source.exclude == ("goose_*",)
    whole = ImageFolderDataModule(str(root), cache_dir=str(tmp_path / "cache"))
    left = ImageFolderDataModule("", sources=[{"path": str(root), "exclude": ["goose_*"]}],
                                 cache_dir=str(tmp_path / "cache"))
    whole.prepare()
    left.prepare()
    count = lambda dm, cls: sum(int((getattr(dm, f"{s}_labels") == cls).sum()) for s in ("train", "val", "test"))  # noqa: E731
    assert count(whole, 0) == 20 and count(left, 0) == 12 and count(left, 1) == 20
    assert left.fingerprint != whole.fingerprint
    with pytest.raises(DataError, match="holds no images"):
        ImageFolderDataModule("", sources=[{"path": str(root), "exclude": ["*"]}], cache_dir=str(tmp_path)).prepare()


def test_every_split_holds_every_source(tmp_path):
    a = make_image_folder(tmp_path / "a", per_class=30, seed=1)
    b = make_image_folder(tmp_path / "b", per_class=20, seed=2, size=48)  # any size: the service's resize
    dm = ImageFolderDataModule(f"{a},{b}", val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm.prepare()
    assert dm.source_names == ["a", "b"] and dm.train_images.shape[1:] == (3, 32, 32)
    for split in ("train", "val", "test"):
        ids = getattr(dm, f"{split}_source")
        labels = getattr(dm, f"{split}_labels")
        for source in (0, 1):  # stratified within each source: every class of every source in every split
            assert set(labels[ids == source].tolist()) == {0, 1, 2, 3}
    # 20% of each class held out for test first: 6 per class of a, 4 per class of b.
    assert dm.split_counts(0)["test"] == {"bird": 6, "boat": 6, "cat": 6, "dog": 6}
    assert dm.split_counts(1)["test"] == {"bird": 4, "boat": 4, "cat": 4, "dog": 4}
    # One source alone keeps its old split and fingerprint: runs of one folder resume and compare as before.
    alone = ImageFolderDataModule(str(a), val_fraction=0.2, test_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    alone.prepare()
    assert torch.equal(alone.test_images, dm.test_images[dm.test_source == 0])


def test_sources_with_other_classes_are_refused_in_one_sentence(tmp_path):
    a = make_image_folder(tmp_path / "a", per_class=6)
    b = make_image_folder(tmp_path / "b", per_class=6, classes=("bird", "cat"))
    with pytest.raises(DataError, match="every source needs the same class folders"):
        ImageFolderDataModule(f"{a},{b}", cache_dir=str(tmp_path / "cache")).prepare()


def test_weights_sample_a_source_more_often():
    ids = torch.tensor([0] * 100 + [1] * 10)
    order = weighted_order(ids, [1.0, 2.5], torch.Generator().manual_seed(0))
    assert (ids[order] == 0).sum() == 100 and (ids[order] == 1).sum() == 25
    batches = TensorBatches(torch.zeros(110, 3, 4, 4, dtype=torch.uint8), ids, 5, shuffle=True, drop_last=True,
                            source_ids=ids, source_weights=[1.0, 2.5])
    assert len(batches) == 125 // 5 == len(list(batches))


def test_outliers_are_held_out_by_class(tmp_path):
    assert outlier_group(Path("tin_n01443537_12.JPEG")) == "tin_n01443537"
    assert outlier_group(Path("cifar_airplane_0001.jpg")) == "cifar_airplane"
    assert outlier_group(Path("kitchen/0001.jpg")) == "kitchen"
    folder = make_outliers(tmp_path / "other" / "images", per_class=5, kinds=10)
    assert load_outlier_folder(tmp_path / "other", cache_dir=str(tmp_path / "cache")).classes == [
        f"texture{k}" for k in range(10)]
    toy = make_image_folder(tmp_path / "toy", per_class=10)
    dm = ImageFolderDataModule(str(toy), outliers=[str(folder.parent)], outlier_holdout=0.2,
                               cache_dir=str(tmp_path / "cache"))
    dm.prepare()
    # 2 of 10 classes held out, one for validation and one for test: 5 images each, never trained on.
    assert len(dm.outlier_val) == len(dm.outlier_test) == 5 and len(dm.outlier_train) == 40
    assert len(set(dm.outlier_train_groups.tolist())) == 8
    # A held-out class scores at most data.outlier_holdout_images of its images; the rest are not trained on.
    capped = ImageFolderDataModule(str(toy), outliers=[str(folder.parent)], outlier_holdout=0.2,
                                   outlier_holdout_images=3, cache_dir=str(tmp_path / "cache"))
    capped.prepare()
    assert len(capped.outlier_val) == len(capped.outlier_test) == 3 and len(capped.outlier_train) == 40
    batches = OutlierBatches(TensorBatches(dm.train_images, dm.train_labels, 8, shuffle=True, drop_last=True),
                             dm.outlier_train, 2, seed=0)
    images, labels = next(iter(batches))
    assert images.shape[0] == 10 and labels.tolist().count(-1) == 2
    with pytest.raises(DataError, match="Outlier folder .* does not exist"):
        ImageFolderDataModule(str(toy), outliers=[str(tmp_path / "missing")]).prepare()


def test_outlier_losses_are_lowest_for_no_answer():
    flat, sure = torch.zeros(4, 4), torch.tensor([[9.0, 0, 0, 0]] * 4)
    assert outlier_loss(flat, "uniform") < outlier_loss(sure, "uniform")
    assert outlier_loss(flat, "uniform").item() == pytest.approx(np.log(4))
    assert outlier_loss(flat - 20, "energy") < outlier_loss(sure + 20, "energy")
    # The margins are the net's scale: logits of about 3 meet (-6, -2) but not Liu et al.'s (-25, -7).
    inside, out = torch.tensor([[5.0, 0, 0, 0]] * 4), torch.full((4, 4), -1.0)
    assert outlier_loss(out, "energy", inside, (-4.0, -2.0)).item() == 0.0 < outlier_loss(out, "energy", inside).item()
    from pipeline.config import resolve_config
    from pipeline.errors import ConfigError

    assert resolve_config("vgg", "cpu", ["optim.outlier_margins=[-6, -2]"]).optim.outlier_margins == [-6, -2]
    with pytest.raises(ConfigError, match="optim.outlier_margins must be two numbers, the in-scope margin below"):
        resolve_config("vgg", "cpu", ["optim.outlier_margins=[-2, -6]"])


@pytest.mark.slow
def test_a_run_of_two_sources_and_outliers_reports_each_and_flags_unseen_outliers(tmp_path, isolated_project):
    a = make_image_folder(tmp_path / "cifarish", per_class=50, seed=3)
    b = make_image_folder(tmp_path / "photoish", per_class=30, seed=4, size=64)
    outliers = make_outliers(tmp_path / "outliers" / "images", per_class=30, kinds=10)
    # The sources as a user's config would give them (data.sources), one of them leaving out files that
    # would otherwise join it (copies of the other source's: were they trained on, the test would not know).
    for label in ("bird", "boat", "cat", "dog"):
        for path in sorted((a / label).iterdir())[:5]:
            (b / label / f"left-out_{path.name}").write_bytes(path.read_bytes())
    sources = json.dumps([str(a), {"path": str(b), "exclude": ["left-out_*"]}])
    assert main(["train", "--set", f"data.sources={sources}", "--outliers", str(outliers.parent), "--models", "lenet",
                 "--epochs", "8", "--set", "data.batch_size=32", "--set", "data.val_fraction=0.2",
                 "--set", "data.outlier_holdout=0.4", "--set", "tracking.system_metrics_interval_s=5",
                 "--set", "trainer.precision=32-true"]) == 0
    uri = f"sqlite:///{isolated_project / 'mlflow.db'}"
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id])
    metrics = run.data.metrics
    # 4 x 50 + 4 x 30 images over the three splits: the 20 left out are in none.
    assert sum(int(run.data.params[f"data.{split}_size"]) for split in ("train", "val", "test")) == 320
    for source in ("cifarish", "photoish"):
        for split in ("val", "test"):
            assert {f"source/{source}/{split}_{key}" for key in ("acc", "balanced_acc", "ece", "out_of_scope_rate")} \
                <= set(metrics)
        assert metrics[f"source/{source}/test_acc"] > 0.5, f"{source}: chance is 0.25"
    # The champion rule's figure: the mean over the two sources of validation accuracy.
    mean = (metrics["source/cifarish/val_acc"] + metrics["source/photoish/val_acc"]) / 2
    assert metrics["val_acc_source_mean"] == pytest.approx(mean, abs=1e-6)
    # Outlier classes never trained on score above the in-scope test split (chance is 0.5), and more of
    # them are flagged. Each held-out side is only two texture classes, so a CPU's numerics move one
    # side's AUROC by a few points (0.79 to 0.92 seen): the pair's mean is the steady figure.
    assert min(metrics["outliers/test/auroc"], metrics["outliers/val/auroc"]) > 0.65
    assert (metrics["outliers/test/auroc"] + metrics["outliers/val/auroc"]) / 2 > 0.8
    assert metrics["outliers/test/flagged"] > 2 * metrics["test_out_of_scope_rate"]
    assert metrics["train/outlier_loss"] > 0
    # The dataset inputs name every source and the outliers.
    names = {d.dataset.name for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert {"cifarish-training", "photoish-test", "outliers-outliers-training"} <= names
    # The model's metadata (what /model shows) lists the sources with their test figures.
    mlflow.set_tracking_uri(uri)
    from pipeline.runtime.onnx_model import OnnxClassifier

    meta = OnnxClassifier.from_mlflow(run.data.tags["model_uri"]).metadata
    assert [s["name"] for s in meta["sources"]] == ["cifarish", "photoish"]
    assert meta["sources"][1]["test_acc"] == pytest.approx(metrics["source/photoish/test_acc"])
    assert meta["outliers"]["classes"] == 10 and meta["outliers"]["test_auroc"] == pytest.approx(metrics["outliers/test/auroc"])
    # The calibration travels with the model: one temperature after the energy loss (by_confidence: auto).
    assert meta["calibration"] == {"base": pytest.approx(metrics["temperature"]), "slope": 0.0, "mean": 0.0, "std": 1.0}


def test_download_photos_writes_both_sets_from_an_archive(tmp_path):
    import io
    import zipfile

    from pipeline.download_photos import download_photos, photo_settings

    settings = photo_settings()
    archive = tmp_path / "tiny-imagenet-200.zip"
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(jpeg, "JPEG")
    with zipfile.ZipFile(archive, "w") as handle:
        for wnid in ("n02123045", "n02085620", "n01443537", "n09428293"):  # tabby, Chihuahua, goldfish, seashore
            for n in (0, 1, 150):
                handle.writestr(f"tiny-imagenet-200/train/{wnid}/images/{wnid}_{n}.JPEG", jpeg.getvalue())
        handle.writestr("tiny-imagenet-200/val/images/val_0.JPEG", jpeg.getvalue())  # never a training image
    written = download_photos(tmp_path / "data", archive, settings, cifar=False)
    assert written == {"photos-train": 6, "outliers-train": 2}
    assert sorted(p.name for p in (tmp_path / "data" / "photos-train" / "cat").iterdir()) == [
        "n02123045_0.JPEG", "n02123045_1.JPEG", "n02123045_150.JPEG"]
    # Images _0 .. _99 of the other classes, less the scenes that often hold a boat or a bird.
    assert sorted(p.name for p in (tmp_path / "data" / "outliers-train" / "images").iterdir()) == [
        "tin_n01443537_0.JPEG", "tin_n01443537_1.JPEG"]
    assert (tmp_path / "data" / "photos-train" / "cat" / "n02123045_0.JPEG").read_bytes() == jpeg.getvalue()
    with pytest.raises(DataError, match="does not exist"):
        download_photos(tmp_path / "x", tmp_path / "missing.zip", settings, cifar=False)
