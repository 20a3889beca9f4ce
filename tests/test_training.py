"""End to end on tiny synthetic images: train -> MLflow run -> MLflow Model -> champion alias."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.cli import main
from pipeline.data import load_image_folder
from pipeline.module import LitClassifier

pytestmark = pytest.mark.slow
TRAIN = ["--epochs", "8", "--set", "data.batch_size=32", "--set", "data.val_fraction=0.2",
         "--set", "tracking.system_metrics_interval_s=0.5"]


@pytest.fixture(scope="module")
def trained_project(toy_folder, tmp_path_factory):
    """LeNet and ResNet-9 trained once for this module's tests (each test then works in that project), on the
    toy set plus one file that does not decode, which ``data.on_bad_image: skip`` leaves out."""
    project = tmp_path_factory.mktemp("trained")
    scraped = project / "scraped"
    shutil.copytree(toy_folder, scraped)
    (scraped / "cat" / "truncated.jpg").write_bytes((scraped / "cat" / "000.jpg").read_bytes()[:200])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIPELINE_HOME", str(project))
        patch.setenv("PIPELINE_CACHE_DIR", str(project / "cache"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(project)
        # An evaluation folder of noise: none of the four classes, so it should be flagged out of scope.
        noise = project / "noise" / "images"
        noise.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise / f"{i}.png")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # what a log file of `make train` would hold
            assert main(["train", "--data", str(scraped), "--models", "lenet,resnet", *TRAIN,
                         "--set", "data.on_bad_image=skip", "--set", f"evaluation.folders.noise={noise.parent}",
                         "--set", f"evaluation.folders.toy={toy_folder}"]) == 0
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cifar4")
    runs = {r.data.tags["family"]: r for r in client.search_runs([experiment.experiment_id])}
    return project, client, runs, printed.getvalue(), scraped


@pytest.fixture
def trained(trained_project, monkeypatch):
    """(client, runs) of the shared training, with this test working in its project."""
    project, client, runs, _, _ = trained_project
    monkeypatch.setenv("PIPELINE_HOME", str(project))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(project / "cache"))
    monkeypatch.chdir(project)
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    return client, runs


def test_training_logs_runs_models_and_champion(trained, trained_project, toy_folder):
    client, runs = trained
    project = trained_project[0]
    assert set(runs) == {"lenet", "resnet"}
    for family, run in runs.items():
        assert run.info.status == "FINISHED"
        params, metrics = run.data.params, run.data.metrics
        assert params["model.arch"] == family and params["trainer.max_epochs"] == "8"
        assert params["optim.muon"] == str(family == "resnet")  # the airbench recipe with Muon trains (resnet.yaml)
        # 10% test held out first (6 per class), then 20% of the rest for validation (11 per class).
        assert (params["data.train_size"], params["data.val_size"], params["data.test_size"]) == ("172", "44", "24")
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 8
        assert len(client.get_metric_history(run.info.run_id, "train/lr")) == 8
        assert {"train/loss", "val/loss", "val/acc_cat", "best/val_acc_dog"} <= set(metrics)
        # Calibration and the out-of-scope signal, measured before and after, on every split and folder.
        assert {"temperature", "out_of_scope_threshold", "val_ece", "val_ece_uncalibrated", "test_nll",
                "test_nll_uncalibrated", "test_brier", "test_out_of_scope_rate", "eval/toy/balanced_acc",
                "eval/toy/ece", "eval/noise/out_of_scope_rate", "eval/noise/auroc_vs_test"} <= set(metrics)
        assert metrics["val_nll"] <= metrics["val_nll_uncalibrated"] + 1e-9  # fitted there to lower it
        assert metrics["val_out_of_scope_rate"] <= 0.1  # the threshold keeps 95% of validation in scope
        assert metrics["best_val_acc"] > 0.5, f"{family} did not learn the toy set (chance is 0.25)"
        assert metrics["test_acc"] > 0.5, f"{family} does not generalise to the held-out test split"
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
        assert artifacts == {"plots/confusion_matrix.png", "plots/learning_curves.png", "plots/mistakes.png",
                             "plots/filters.png", "plots/feature_maps", "plots/reliability.png"}
        for name in artifacts - {"plots/filters.png", "plots/feature_maps"}:
            with Image.open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=name)) as png:
                assert png.format == "PNG" and png.width >= (200 if "mistakes" in name else 300)
        maps = sorted(a.path.rsplit("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "plots/feature_maps"))
        stages = {"lenet": ["conv1", "pool1", "conv2"], "resnet": ["whiten", "layer1", "layer2", "layer3"]}[family]
        assert maps[:-1] == ["00_input.png", *[f"{i:02d}_{name}.png" for i, name in enumerate(stages, 1)]]
        assert maps[-1].startswith(f"{len(stages) + 1:02d}_gradcam_")
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)
        inputs = {i.tags[0].value: i.dataset for i in client.get_run(run.info.run_id).inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation", "test"}
        assert inputs["training"].digest == run.data.tags["data_fingerprint"]
        assert json.loads(inputs["test"].profile)["per_class"] == {c: 6 for c in ("bird", "boat", "cat", "dog")}
        assert run.data.tags["git_commit"] and run.data.tags["data_fingerprint"]

    # The champion is the better run, and its model carries its metadata.
    best = max(runs.values(), key=lambda r: r.data.metrics["best_val_acc"])
    # Noise is far from every training image in the champion's features: flagged, and ranked above the test split.
    assert best.data.metrics["eval/noise/auroc_vs_test"] > 0.9
    assert best.data.metrics["eval/noise/out_of_scope_rate"] > 0.5 > best.data.metrics["test_out_of_scope_rate"]
    champion = client.get_model_version_by_alias("cifar4-classifier", "champion")
    assert champion.run_id == best.info.run_id
    tags = champion.tags
    assert tags["family"] == best.data.tags["family"] and tags["val_acc"] == f"{best.data.metrics['best_val_acc']:.4f}"
    assert tags["test_acc"] == f"{best.data.metrics['test_acc']:.4f}" and tags["git_commit"] and tags["data_digest"]
    assert "test accuracy" in champion.description
    experiment = client.get_experiment_by_name("cifar4")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's "Model training" mode
    info = mlflow.models.get_model_info("models:/cifar4-classifier@champion")
    assert info.metadata["classes"] == ["bird", "boat", "cat", "dog"]
    assert {"mean", "std", "image_size", "arch", "model_args", "temperature", "calibration"} <= set(info.metadata)
    assert info.metadata["calibration"]["base"] == pytest.approx(best.data.metrics["temperature"])
    assert best.data.metrics["temperature_slope"] == 0.0  # no outliers in training: one number (by_confidence: auto)
    assert info.metadata["out_of_scope"]["threshold"] == pytest.approx(best.data.metrics["out_of_scope_threshold"])

    # Loaded back through MLflow, without the training code: same probabilities as the trained net.
    data = load_image_folder(toy_folder, cache_dir=project / "cache")
    images = data.images[:40]
    pyfunc = mlflow.pyfunc.load_model("models:/cifar4-classifier@champion")
    answer = pyfunc.predict(images.numpy().astype(np.float32) / 255.0)
    probabilities = answer["probabilities"]
    assert answer["out_of_scope_score"].shape == (40,)
    # The run logs its final weights (checkpoint.select: last).
    checkpoint = project / "checkpoints" / "cifar4" / best.info.run_id / "last.ckpt"
    net = LitClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).model.eval()
    with torch.inference_mode():
        logits = net(images.float() / 255.0).double().numpy()
    # model.onnx divides the logits by the temperature fitted on the validation split: T0 x exp(slope x the
    # z-score of the image's top logit), written out here from the numbers in the model's metadata.
    shape = info.metadata["calibration"]
    top = (logits.max(axis=1) - shape["mean"]) / shape["std"]
    calibrated = logits / (best.data.metrics["temperature"] * np.exp(best.data.metrics["temperature_slope"] * top))[:, None]
    expected = np.exp(calibrated - calibrated.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_champion_only_moves_for_a_better_run(trained, toy_folder):
    client, runs = trained
    before = client.get_model_version_by_alias("cifar4-classifier", "champion")
    # One epoch of LeNet cannot beat the champion: the alias stays where it is.
    assert main(["train", "--data", str(toy_folder), "--models", "lenet", "--epochs", "1"]) == 0
    after = client.get_model_version_by_alias("cifar4-classifier", "champion")
    assert after.version == before.version


def test_evaluate_scores_the_champion(trained, toy_folder, capsys):
    client, _ = trained
    assert main(["evaluate", "--data", str(toy_folder), "--log"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "Logged to MLflow run" in out
    evaluations = client.get_experiment_by_name("cifar4-evaluations")
    (run,) = client.search_runs([evaluations.experiment_id])
    assert run.data.metrics["eval/acc"] > 0.5


def test_wrong_data_folder_is_one_clear_sentence(tmp_path, toy_folder, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--models", "lenet"]) == 2
    err = capsys.readouterr().err
    assert "error: Data folder" in err and "missing' does not exist." in err and "Traceback" not in err
    # An evaluation folder is checked before any training, not after the last epoch.
    assert main(["train", "--data", str(toy_folder), "--models", "lenet",
                 "--set", f"evaluation.folders.photos={tmp_path / 'nowhere'}"]) == 2
    err = capsys.readouterr().err
    assert "Evaluation folder 'photos'" in err and "does not exist or is not a folder." in err
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_ddp_trains_the_airbench_families_past_the_whitening_freeze(toy_folder, isolated_project):
    """The multi-GPU recipe's strategy with 2 CPU processes (gloo): VGG and ResNet-9 stop training their
    whitening bias after optim.whiten_bias_epochs (3); the runs must go past it and finish."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", "--data", str(toy_folder), "--models", "vgg,resnet",
         "--profile", "cpu", "--epochs", "4", "--set", "trainer.strategy=ddp", "--set", "trainer.devices=2",
         "--set", "data.batch_size=32", "--set", "model.args.widths=[8,16,16]"],
        capture_output=True, text=True, timeout=600, cwd=isolated_project,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{isolated_project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cifar4").experiment_id])
    assert {r.data.tags["family"] for r in runs} == {"vgg", "resnet"}
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.params["trainer.strategy"] == "ddp"
        assert len(client.get_metric_history(run.info.run_id, "val/acc")) == 4
    assert client.get_model_version_by_alias("cifar4-classifier", "champion").run_id in {r.info.run_id for r in runs}


def test_logs_get_one_line_per_epoch_and_terminals_keep_the_bar(trained_project):
    from lightning.pytorch.callbacks import RichProgressBar

    from pipeline.progress import EpochLines, progress_callback

    printed = trained_project[3]  # the shared run's output, written to a file-like (not a terminal)
    for family in ("lenet", "resnet"):
        lines = [line for line in printed.splitlines() if line.startswith(f"{family} epoch ")]
        assert [line.split(":")[0] for line in lines] == [f"{family} epoch {i}/8" for i in range(1, 9)]
        assert all("train loss" in line and "val loss" in line and " acc " in line and "ETA" in line
                   for line in lines)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress_callback("lenet", Terminal()), RichProgressBar)
    assert isinstance(progress_callback("lenet", io.StringIO()), EpochLines)


def test_the_alias_can_be_moved_back_by_hand(trained, capsys):
    client, _ = trained
    before = client.get_model_version_by_alias("cifar4-classifier", "champion").version
    try:
        assert main(["champion", "--version", "1"]) == 0
        assert str(client.get_model_version_by_alias("cifar4-classifier", "champion").version) == "1"
        out = capsys.readouterr().out
        assert ("nothing changed" in out) if str(before) == "1" else (f"moved from version {before}" in out)
        assert main(["champion", "--version", "99"]) == 2
        assert "has no version 99" in capsys.readouterr().err
    finally:  # the module's other tests share this registry
        client.set_registered_model_alias("cifar4-classifier", "champion", before)


def test_skip_trains_past_a_broken_file_and_logs_the_count(trained_project, capsys):
    project, client, runs, printed, scraped = trained_project
    # Without skip, the broken file stops the run before training, naming it.
    assert main(["train", "--data", str(scraped), "--models", "lenet", "--epochs", "1"]) == 2
    assert "truncated.jpg' could not be decoded" in capsys.readouterr().err
    # The shared run skipped it, said so and logged the count.
    assert printed.count("skipped 1 of 241 images") >= 1
    for run in runs.values():
        assert run.data.metrics["data_skipped_images"] == 1 and run.data.params["data.skipped_images"] == "1"
        assert sum(int(run.data.params[f"data.{split}_size"]) for split in ("train", "val", "test")) == 240
