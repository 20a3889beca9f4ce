"""What the network sees: Grad-CAM against autograd, pictures in every MLflow run, POST /explain."""

from __future__ import annotations

import base64
import io
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.runtime import pictures
from pipeline.explain_graph import ExplainNet, gradcam_autograd
from pipeline.models import build_model
from pipeline.module import Classifier
from test_service import assert_bad_inputs_rejected, toy_files

FAMILIES = [("lenet", {}), ("vgg", {"cfg": "small"}), ("vgg", {"cfg": "vgg8"}), ("resnet", {"depth": 8, "width": 1}),
            ("vgg", {"cfg": "airbench", "widths": [16, 32, 32], "tta": 2}),
            ("resnet", {"variant": "resnet9", "widths": [16, 32, 32], "tta": 1})]


def trained_like(arch: str, args: dict) -> Classifier:
    torch.manual_seed(0)
    args = dict(args)
    tta = args.pop("tta", 0)
    net = build_model(arch, 4, **args)
    for module in net.modules():  # BatchNorm statistics away from the identity, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return Classifier(net, [0.5, 0.45, 0.4], [0.25, 0.25, 0.26], tta=tta).eval()


@pytest.mark.parametrize("arch,args", FAMILIES, ids=[f"{a}-{v}" for a, v in FAMILIES])
def test_gradcam_without_autograd_equals_autograd(arch, args):
    classifier = trained_like(arch, args)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        outputs = ExplainNet(classifier)(images)
        expected = torch.softmax(classifier(images), dim=-1)
    reference = gradcam_autograd(classifier, images)
    torch.testing.assert_close(outputs[0], expected)
    assert outputs[-1].shape == reference.shape and reference.max() > 0
    torch.testing.assert_close(outputs[-1], reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))
    # Composing the stages and the head is the network itself.
    x = (images - classifier.mean) / classifier.std
    with torch.no_grad():
        for _, stage in classifier.net.explain_stages():
            x = stage(x)
        for layer in classifier.net.explain_head():
            x = layer(x)
        torch.testing.assert_close(x, classifier.net((images - classifier.mean) / classifier.std))


def test_a_head_grad_cam_cannot_go_through_is_named():
    from pipeline.explain_graph import head_gradients

    with pytest.raises(ValueError, match="cannot go back through Sigmoid"):
        head_gradients([torch.nn.Flatten(), torch.nn.Sigmoid(), torch.nn.Linear(16, 4)], torch.rand(2, 1, 4, 4))


def test_grids_and_kernels():
    maps = np.random.default_rng(0).random((6, 28, 28)).astype(np.float32)
    grid = pictures.feature_map_grid(maps)  # 2 rows x 3 cols of 56-pixel tiles, 2-pixel gaps
    assert grid.shape == (2 * 56 + 2, 3 * 56 + 2 * 2) and grid.dtype == np.uint8
    assert pictures.feature_map_grid(np.zeros((300, 4, 4), np.float32)).shape == (8 * 64 + 7 * 2,) * 2  # 64 shown
    filters = pictures.filter_grid(np.random.default_rng(1).normal(size=(16, 3, 3, 3)))
    assert filters.shape == (4 * 36 + 3 * 2, 4 * 36 + 3 * 2, 3)
    step = np.zeros((16, 16, 3), np.uint8)
    step[:, 8:] = 200
    out = pictures.apply_kernels(step)
    assert set(out) == {"box blur", "vertical edges", "horizontal edges", "sharpen"}
    assert out["vertical edges"][:, 7:9].min() == 255 and out["vertical edges"][:, :6].max() == 0
    assert out["horizontal edges"].max() == 0
    assert out["box blur"][5, 8] == round(200 * 2 / 3) and out["box blur"][5, 12] == 200
    assert out["sharpen"][5, 8] == 255 and out["sharpen"][5, 7] == 0
    cam = np.zeros((8, 8), np.float32)
    cam[2, 2] = 1
    heat = pictures.overlay(np.full((32, 32, 3), 128, np.uint8), cam)
    assert heat.shape == (128, 128, 3) and not np.array_equal(heat[36, 36], heat[120, 120])


def png_size(data: bytes) -> tuple[int, int]:
    image = Image.open(io.BytesIO(data))
    image.load()  # a truncated or corrupt PNG fails here
    assert image.format == "PNG"
    return image.size


def test_every_run_logs_the_pictures(served):
    """The LeNet run trained by the `served` fixture: its artifacts, read from its MLflow store."""
    _, _, project = served
    with sqlite3.connect(project / "mlflow.db") as db:
        (artifact_uri,) = db.execute("select artifact_uri from runs where name = 'lenet'").fetchone()
    plots = Path(artifact_uri.removeprefix("file://")) / "plots"
    sizes = {p.relative_to(plots).as_posix(): png_size(p.read_bytes()) for p in plots.rglob("*.png")}
    # LeNet: 6 filters 5x5 (7x upscaled) in 2x3; conv1 6 maps 28x28 and pool1 6 of 14x14 as 2x3 tiles of 56;
    # conv2 16 maps 10x10 as 4x4 tiles of 60.
    assert sizes["filters.png"] == (3 * 35 + 2 * 2, 2 * 35 + 2)
    assert sizes["feature_maps/00_input.png"] == (128, 128)
    assert sizes["feature_maps/01_conv1.png"] == (3 * 56 + 4, 2 * 56 + 2)
    assert sizes["feature_maps/02_pool1.png"] == (3 * 56 + 4, 2 * 56 + 2)
    assert sizes["feature_maps/03_conv2.png"] == (4 * 60 + 6, 4 * 60 + 6)
    gradcam = [name for name in sizes if name.startswith("feature_maps/04_gradcam_")]
    assert len(gradcam) == 1 and sizes[gradcam[0]] == (128, 128)
    for name in ("mistakes.png", "confusion_matrix.png", "learning_curves.png"):
        width, height = sizes[name]
        assert width >= 200 and height >= 200, name


def decode_png(b64: str) -> tuple[int, int]:
    return png_size(base64.b64decode(b64))


def test_explain_matches_classify_and_returns_pictures(served, toy_folder):
    url, model, _ = served
    for path in toy_files(toy_folder)[:4]:
        data = path.read_bytes()
        classified = httpx.post(f"{url}/classify", files={"image": (path.name, data)}).json()
        response = httpx.post(f"{url}/explain", files={"image": (path.name, data)}, timeout=30)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["probabilities"] == classified["probabilities"] and body["label"] == classified["label"]
        assert body["saliency"]["class"] == body["label"] and body["saliency"]["stage"] == "conv2"
        assert [(s["name"], s["shape"]) for s in body["stages"]] == [
            ("conv1", [6, 28, 28]), ("pool1", [6, 14, 14]), ("conv2", [16, 10, 10])]
        assert decode_png(body["stages"][2]["png"]) == (4 * 60 + 6, 4 * 60 + 6)
        for picture in (body["input"], body["saliency"]["overlay"], body["saliency"]["heatmap"]):
            assert decode_png(picture) == (128, 128)
        assert [k["name"] for k in body["kernels"]] == list(pictures.KERNELS)
        assert all(decode_png(k["png"]) == (128, 128) for k in body["kernels"])
        assert body["first_layer"]["shape"] == [6, 3, 5, 5]
        assert decode_png(body["first_layer"]["filters"]) == (3 * 35 + 4, 2 * 35 + 2)
    # Another class's Grad-CAM on request; the probabilities do not change.
    other = next(c for c in model.classes if c != body["label"])
    again = httpx.post(f"{url}/explain", params={"target": other}, files={"image": (path.name, data)}).json()
    assert again["saliency"]["class"] == other and again["probabilities"] == body["probabilities"]


def test_explain_rejects_bad_input_like_classify(served, toy_folder):
    url, _, _ = served
    assert_bad_inputs_rejected(f"{url}/explain", toy_folder)
    good = toy_files(toy_folder)[0].read_bytes()
    response = httpx.post(f"{url}/explain", params={"target": "horse"}, files={"image": ("a.jpg", good)})
    assert response.status_code == 400 and "Unknown target class 'horse'" in response.json()["error"]
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_ui_page_needs_nothing_from_the_internet(served):
    url, _, _ = served
    response = httpx.get(f"{url}/ui")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" in page and 'id="file"' in page
    for needle in ("http://", "https://", "//cdn", "src=\"//"):
        assert needle not in page, needle
