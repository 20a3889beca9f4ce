"""Calibrated probabilities and the out-of-scope score: the pieces, checked against what they promise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.calibration import Temperature, fit_temperature, fit_temperature_by_confidence
from pipeline.calibration import calibration_scores
from pipeline.evaluation import auroc, fpr_at_tpr
from pipeline.models import build_model, discover
from pipeline.module import Classifier
from pipeline.scope import Deployed, NearestNeighbourScore, features, knn_scores, threshold_for


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sampled_labels(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cumulative = probabilities.cumsum(axis=1)
    return (rng.random((len(probabilities), 1)) > cumulative).sum(axis=1)


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20000, 4))
    labels = sampled_labels(softmax(logits / 2.0), rng)  # labels drawn as a model with T = 2 would say
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(2.0, rel=0.05)
    before = calibration_scores(softmax(logits), labels)
    after = calibration_scores(softmax(logits / temperature), labels)
    assert before["mean_confidence"] > before["acc"] + 0.05  # overconfident before
    assert after["ece"] < 0.015 < 0.05 < before["ece"]
    assert after["nll"] < before["nll"] and after["brier"] < before["brier"]
    assert after["acc"] == before["acc"]  # one temperature never changes the answer


def test_a_large_source_does_not_set_the_temperature_alone():
    """Two sources whose images want different temperatures (1 and 3), one nine times the other's size: the
    pooled fit lands near the large one's; the source-balanced fit between them, and it calibrates the small
    source better at a small cost to the large one."""
    rng = np.random.default_rng(2)
    big, small = rng.normal(0, 3, (18000, 4)), rng.normal(0, 3, (2000, 4))
    labels = np.concatenate([sampled_labels(softmax(big / 1.0), rng), sampled_labels(softmax(small / 3.0), rng)])
    logits, groups = np.concatenate([big, small]), np.repeat([0, 1], [18000, 2000])
    pooled = fit_temperature(logits, labels)
    balanced = fit_temperature(logits, labels, groups=groups)
    assert pooled < 1.35 < 1.5 < balanced < 2.5
    ece = lambda t, g: calibration_scores(softmax(logits[groups == g] / t), labels[groups == g])["ece"]  # noqa: E731
    assert ece(balanced, 1) < ece(pooled, 1) - 0.05
    assert max(ece(balanced, 0), ece(balanced, 1)) < max(ece(pooled, 0), ece(pooled, 1))
    assert fit_temperature(logits, labels, groups=np.zeros(len(labels))) == pytest.approx(pooled)


def test_a_temperature_that_grows_with_the_top_logit_calibrates_what_one_number_cannot():
    """Labels drawn as a net trained with outlier exposure answers: too flat where it is unsure and sharp where
    it is sure, T = 0.7 x exp(0.4 x the top logit's z-score). One number leaves both ends off; the fitted
    shape finds the rule, calibrates both ends, and never changes an answer. Labels from one T give slope ~0."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2.5, (30000, 4))
    top = logits.max(axis=1)
    made = Temperature(0.7, 0.4, float(top.mean()), float(top.std()))
    labels = sampled_labels(softmax(made.apply(logits)), rng)
    fitted = fit_temperature_by_confidence(logits, labels)
    assert fitted.slope == pytest.approx(0.4, abs=0.06) and fitted.base == pytest.approx(0.7, rel=0.06)
    flat = fit_temperature(logits, labels)
    one, shaped = softmax(logits / flat), softmax(fitted.apply(logits))
    assert calibration_scores(shaped, labels)["ece"] < 0.015 < 0.03 < calibration_scores(one, labels)["ece"]
    assert calibration_scores(shaped, labels)["nll"] < calibration_scores(one, labels)["nll"]
    assert np.array_equal(shaped.argmax(axis=1), logits.argmax(axis=1))
    # Where the unsure half is: one number makes it underconfident; the shape does not.
    unsure = top < np.median(top)
    for probabilities, gap in ((one, 0.04), (shaped, -0.015)):
        right = (probabilities.argmax(axis=1) == labels)[unsure].mean()
        assert right - probabilities.max(axis=1)[unsure].mean() > gap
    plain = sampled_labels(softmax(logits / 1.5), rng)
    again = fit_temperature_by_confidence(logits, plain)
    assert abs(again.slope) < 0.05 and again.base == pytest.approx(1.5, rel=0.05)


def test_the_shaped_temperature_is_inside_the_exported_graph(tmp_path):
    from pipeline.export import export_onnx
    from pipeline.runtime.onnx_model import OnnxClassifier

    torch.manual_seed(0)
    classifier = Classifier(build_model("lenet", 4), [0.5] * 3, [0.25] * 3, tta=1).eval()
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        logits = classifier(images.float() / 255).double().numpy()
    shape = Temperature(0.6, 0.5, float(logits.max(axis=1).mean()), float(logits.max(axis=1).std()) + 1e-3)
    classifier.set_temperature(shape)
    model = OnnxClassifier(export_onnx(classifier, 32, tmp_path / "model.onnx"), {"classes": list("abcd"),
                                                                                   "image_size": 32})
    probabilities = model.predict(images.numpy())[0]
    np.testing.assert_allclose(probabilities, softmax(shape.apply(logits)), atol=1e-5)
    assert not np.allclose(probabilities, softmax(logits / 0.6), atol=1e-3)  # the slope is in the graph


def test_auroc_and_the_false_positive_rate_count_what_they_say():
    rng = np.random.default_rng(1)
    inside = rng.integers(0, 20, 300).astype(float)  # many ties
    outside = rng.integers(5, 30, 200).astype(float)
    pairs = (outside[None, :] > inside[:, None]).mean() + 0.5 * (outside[None, :] == inside[:, None]).mean()
    assert auroc(inside, outside) == pytest.approx(pairs)
    assert auroc(np.zeros(5), np.ones(5)) == 1.0 and auroc(np.ones(5), np.zeros(5)) == 0.0
    threshold = np.quantile(inside, 0.95)
    assert fpr_at_tpr(inside, outside) == pytest.approx((outside <= threshold).mean())
    assert np.mean(inside <= threshold_for(inside, 0.95)) >= 0.95


@pytest.mark.parametrize("arch,args", [("lenet", {}), ("vgg", {"cfg": "airbench", "widths": [8, 16, 16]}),
                                       ("vgg", {"cfg": "small"}), ("resnet", {"variant": "resnet9",
                                                                              "widths": [8, 16, 16]}),
                                       ("resnet", {"variant": "cifar", "depth": 8})])
@pytest.mark.parametrize("tta", [0, 1, 2])
def test_features_and_logits_give_the_logits_of_every_family(arch, args, tta):
    """The graph computes the TTA logits from averaged penultimate features in one net call: the same
    numbers as the net's own forward."""
    assert arch in discover()
    torch.manual_seed(0)
    classifier = Classifier(build_model(arch, 4, **args), [0.5] * 3, [0.25] * 3, tta=tta).eval()
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        feats, logits = classifier.features_and_logits(images)
        expected = classifier(images)
    assert feats.ndim == 2 and feats.shape[0] == 6
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_exported_graph_gives_calibrated_probabilities_and_scores(tmp_path):
    from pipeline.export import export_onnx, torch_outputs
    from pipeline.runtime.onnx_model import OnnxClassifier

    torch.manual_seed(0)
    classifier = Classifier(build_model("lenet", 4), [0.5] * 3, [0.25] * 3, tta=1, temperature=0.5).eval()
    bank_images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    scorer = NearestNeighbourScore(features(classifier, bank_images), k=1)
    deployed = Deployed(classifier, scorer)
    path = export_onnx(deployed, 32, tmp_path / "model.onnx")
    metadata = {"classes": ["bird", "boat", "cat", "dog"], "image_size": 32,
                "out_of_scope": {"score": "knn-cosine", "k": 1, "threshold": 0.01}}
    model = OnnxClassifier(path, metadata)
    probe = torch.cat([bank_images[:5], torch.full((3, 3, 32, 32), 255, dtype=torch.uint8)])
    probabilities, scores = model.predict(probe.numpy())
    expected, expected_scores = torch_outputs(deployed, probe)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # Calibration is inside the graph: the temperature sharpens the net's own softmax.
    with torch.no_grad():
        raw = torch.softmax(classifier(probe.float() / 255), dim=1).numpy()
    np.testing.assert_allclose(probabilities, softmax(np.log(raw) / 0.5), atol=1e-5)
    # A bank image is its own nearest neighbour: score ~0, in scope; the same numpy rule agrees.
    assert np.all(scores[:5] < 1e-4) and not model.out_of_scope(scores[:5]).any()
    bank = scorer.bank.numpy()
    np.testing.assert_allclose(knn_scores(bank, features(classifier, probe).numpy(), 1), scores, atol=1e-4)
    # A model without the threshold in its metadata answers None rather than a made-up flag.
    bare = OnnxClassifier(path, {k: v for k, v in metadata.items() if k != "out_of_scope"})
    assert bare.predict(probe.numpy())[1] is None and bare.out_of_scope(None) is None
    json.dumps(metadata)  # what classifier.json holds is plain JSON


def test_zoom_and_colour_jitter_keep_images_in_range_and_are_off_at_zero():
    from pipeline.data import color_jitter_batch, zoom_batch

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(16, 3, 32, 32, generator=generator)
    zoomed = zoom_batch(images, 0.5, generator=generator)
    assert zoomed.shape == images.shape and 0 <= zoomed.min() and zoomed.max() <= 1
    assert not torch.allclose(zoomed, images)
    # A full-size box with no aspect change is the image itself.
    same = zoom_batch(images, 0.999999, max_aspect=1.0, generator=generator)
    torch.testing.assert_close(same, images, atol=1e-4, rtol=0)
    jittered = color_jitter_batch(images, 0.3, generator)
    assert jittered.shape == images.shape and 0 <= jittered.min() and jittered.max() <= 1
    torch.testing.assert_close(color_jitter_batch(images, 0.0, generator), images)


def test_the_energy_score_in_the_graph_is_minus_the_logsumexp_of_the_calibrated_logits(tmp_path):
    from pipeline.export import export_onnx
    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.scope import EnergyScore

    torch.manual_seed(1)
    classifier = Classifier(build_model("resnet", 4, variant="resnet9", widths=[8, 16, 16]), [0.5] * 3, [0.25] * 3,
                            tta=1, temperature=1.7).eval()
    path = export_onnx(Deployed(classifier, EnergyScore()), 32, tmp_path / "model.onnx")
    model = OnnxClassifier(path, {"classes": ["bird", "boat", "cat", "dog"], "image_size": 32,
                                  "out_of_scope": {"score": "energy", "threshold": 0.0}})
    images = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    probabilities, scores = model.predict(images.numpy())
    with torch.no_grad():
        calibrated = classifier(images.float() / 255) / 1.7
    np.testing.assert_allclose(scores, -torch.logsumexp(calibrated, 1).numpy(), atol=1e-4)
    np.testing.assert_allclose(probabilities, torch.softmax(calibrated, 1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(model.out_of_scope(scores), scores > 0.0)


def test_the_combined_score_is_the_larger_of_the_two_in_validation_deviations(tmp_path):
    """model.onnx computes max(energy z-score, kNN z-score - knn_margin), as the trust step measured it."""
    from pipeline.export import export_onnx
    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.scope import CombinedScore, EnergyScore

    torch.manual_seed(2)
    classifier = Classifier(build_model("lenet", 4), [0.5] * 3, [0.25] * 3, tta=1, temperature=0.8).eval()
    bank = features(classifier, torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8))
    knn = NearestNeighbourScore(bank, k=3)
    scorer = CombinedScore(knn, (-2.0, 0.5), (0.1, 0.05), margin=1.0)
    path = export_onnx(Deployed(classifier, scorer), 32, tmp_path / "model.onnx")
    model = OnnxClassifier(path, {"classes": ["bird", "boat", "cat", "dog"], "image_size": 32,
                                  "out_of_scope": {"score": "combined", "threshold": 1.0}})
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    _, scores = model.predict(images.numpy())
    with torch.no_grad():
        feats, logits = classifier.features_and_logits(images.float() / 255)
        energy = EnergyScore()(feats, logits / 0.8).numpy()
    distance = knn_scores(bank.numpy(), feats.numpy(), 3)
    np.testing.assert_allclose(scores, np.maximum((energy + 2.0) / 0.5, (distance - 0.1) / 0.05 - 1.0), atol=1e-3)


def test_publishing_runs_each_split_through_the_net_once():
    """make_trustworthy computes each split's outputs once; publishing scores and plots those same answers."""
    from types import SimpleNamespace

    from pipeline.config import Config
    from pipeline.trust import make_trustworthy

    torch.manual_seed(0)
    classifier = Classifier(build_model("lenet", 4), [0.5] * 3, [0.25] * 3, tta=1)
    seen: list[int] = []
    original = classifier.features_and_logits
    classifier.features_and_logits = lambda images: (seen.append(len(images)), original(images))[1]

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)

    labels = lambda n: torch.arange(n) % 4  # noqa: E731
    dm = SimpleNamespace(classes=["bird", "boat", "cat", "dog"], source_names=["data"],
                         train_images=images(30), train_labels=labels(30), val_images=images(20),
                         val_labels=labels(20), test_images=images(16), test_labels=labels(16),
                         outlier_val=images(12), outlier_test=images(8))
    config = Config.from_dict({"out_of_scope": {"score": "combined", "bank_size": 30}})
    _, report = make_trustworthy(config, classifier, dm)
    # bank (30 training images), validation (20), test (16), validation and test outliers (12, 8): once each.
    assert sorted(seen) == sorted([30, 20, 16, 12, 8])
    assert set(report.answers) == {"val", "test"} and len(report.answers["test"][0]) == 16
    assert {"outliers/val/auroc", "outliers/test/auroc", "val_ece", "test_ece"} <= set(report.metrics)


def test_the_threshold_keeps_the_share_of_every_source():
    """Two sources whose in-scope scores differ: the pooled quantile would flag far more of the smaller one."""
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.normal(0, 1, 9000), rng.normal(1, 1, 1000)])
    sources = np.repeat([0, 1], [9000, 1000])
    pooled, each = threshold_for(scores, 0.95), threshold_for(scores, 0.95, sources)
    assert np.mean(scores[sources == 1] <= pooled) < 0.90  # the big source sets a pooled threshold
    for source in (0, 1):
        assert np.mean(scores[sources == source] <= each) >= 0.95
    assert threshold_for(scores, 0.95, np.zeros(len(scores))) == pooled  # one source: as before


def test_the_export_check_allows_for_the_combined_scores_scale():
    """A combined score divides by validation spreads: the check's tolerance grows by as much, not more."""
    from pipeline.scope import CombinedScore, EnergyScore, score_tolerance

    bank = NearestNeighbourScore(torch.randn(20, 8), k=1)
    assert score_tolerance(None) == score_tolerance(EnergyScore()) == score_tolerance(bank) == 1e-4
    assert score_tolerance(CombinedScore(bank, (0.0, 5.0), (0.1, 0.001))) == pytest.approx(0.1)
    assert score_tolerance(CombinedScore(bank, (0.0, 5.0), (0.1, 2.0))) == 1e-4
