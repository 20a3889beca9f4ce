"""The airbench-style recipe and the fixes that otherwise only show on a GPU or under DDP."""

from __future__ import annotations

import pytest
import torch

from pipeline.data import ImageFolderDataModule, TensorBatches, alternating_flip_mask
from pipeline.models import build_model
from pipeline.models.layers import PatchWhitening
from pipeline.module import Classifier
from pipeline.recipe import Lookahead, lr_factor, optimizer_groups, tta_logits
from toy_data import make_image_folder


def test_patch_whitening_whitens_the_training_patches():
    torch.manual_seed(0)
    # Correlated channels: the whitened 2x2 patches must come out decorrelated with unit variance.
    base = torch.randn(400, 1, 16, 16)
    images = torch.cat([base, 0.9 * base + 0.1 * torch.randn_like(base), torch.randn_like(base)], 1)
    layer = PatchWhitening(3, 2, eps=1e-6)
    layer.init_from(images)
    with torch.no_grad():
        out = layer(images)[:, :12]  # the +filters; the other 12 are their negatives
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(flat.T)
    assert torch.allclose(covariance, torch.eye(12), atol=0.08)
    assert not layer.weight.requires_grad and layer.bias.requires_grad


@pytest.mark.parametrize("arch, args", [("vgg", {"cfg": "airbench", "widths": [16, 32, 32]}),
                                        ("resnet", {"variant": "resnet9", "widths": [16, 32, 32]})])
def test_recipe_nets_keep_named_stages_and_frozen_bn_scale(arch, args):
    net = build_model(arch, 4, **args).eval()
    stages = [name for name, _ in net.explain_stages()]
    assert stages[0] == "whiten" and len(stages) == 4
    images = torch.rand(2, 3, 32, 32)
    x = images
    with torch.no_grad():
        for _, stage in net.explain_stages():
            x = stage(x)
        for layer in net.explain_head():
            x = layer(x)
        assert x.shape == (2, 4) and torch.allclose(x, net(images), atol=1e-6)
    bn = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn and all(not m.weight.requires_grad and m.bias.requires_grad for m in bn)


def test_tta_is_flip_invariant_and_level_zero_is_the_plain_net():
    torch.manual_seed(0)
    net = build_model("vgg", 4, cfg="airbench", widths=[8, 16, 16]).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tta_logits(net, images, 0), net(images))
        for level in (1, 2):
            assert torch.allclose(tta_logits(net, images, level), tta_logits(net, images.flip(-1), level), atol=1e-5)
    classifier = Classifier(net, [0.5] * 3, [0.25] * 3, tta=2).eval()
    with torch.no_grad():
        assert torch.allclose(classifier(images), classifier.logits(images, 2))
    with pytest.raises(ValueError, match="tta level must be 0"):
        tta_logits(net, images, 3)


def test_optimizer_groups_use_airbench_units():
    net = build_model("vgg", 4, cfg="airbench", widths=[8, 16, 16])
    groups = optimizer_groups(net, lr=11.5, weight_decay=0.0153, momentum=0.85, batch_size=512, bias_lr_scale=64)
    others, biases = groups
    assert biases["lr"] == pytest.approx(64 * others["lr"])
    # The decay per step (lr * weight_decay) is the same in both groups: decoupled from the learning rate.
    assert others["lr"] * others["weight_decay"] == pytest.approx(biases["lr"] * biases["weight_decay"])
    assert others["lr"] == pytest.approx(11.5 / (1024 * (1 + 1 / 0.15)) * 512)
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert lr_factor(0, 100, 0.23, 0.2, 0.07) == pytest.approx(0.2) and lr_factor(23, 100, 0.23, 0.2, 0.07) == 1.0
    assert lr_factor(100, 100, 0.23, 0.2, 0.07) == pytest.approx(0.07)


def test_lookahead_pulls_the_net_to_its_average():
    net = torch.nn.Linear(2, 2)
    lookahead = Lookahead(net)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, 0.5)
    assert torch.allclose(net.weight, start + 0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    lookahead.update(net, 1.0)  # decay 1: the net becomes the average again
    assert torch.allclose(net.weight, start + 0.5)


def test_alternating_flip_mirrors_each_image_every_other_epoch():
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 1, 2).clone()
    images[:, :, :, 1] += 100  # left pixel i, right pixel i + 100: a flip is visible
    mask = alternating_flip_mask(8, seed=0)
    batches = TensorBatches(images, torch.arange(8), 8, shuffle=False, flip_mask=mask)
    epoch0 = next(iter(batches))[0]
    epoch1 = next(iter(batches))[0]
    flipped0 = epoch0[:, 0, 0, 0] >= 100
    flipped1 = epoch1[:, 0, 0, 0] >= 100
    assert torch.equal(flipped0, mask) and torch.equal(flipped1, ~mask)


def test_test_split_is_held_out_before_validation(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20)
    dm = ImageFolderDataModule(str(root), val_fraction=0.2, test_fraction=0.1, cache_dir=str(tmp_path / "c"))
    dm.prepare()
    sizes = (len(dm.train_labels), len(dm.val_labels), len(dm.test_labels))
    assert sizes == (56, 16, 8)
    as_set = lambda t: {bytes(x.numpy()) for x in t}  # noqa: E731
    train, val, test = as_set(dm.train_images), as_set(dm.val_images), as_set(dm.test_images)
    assert train.isdisjoint(test) and val.isdisjoint(test) and train.isdisjoint(val)
    # A different validation fraction never moves the test split.
    other = ImageFolderDataModule(str(root), val_fraction=0.3, test_fraction=0.1, cache_dir=str(tmp_path / "c"))
    other.prepare()
    assert as_set(other.test_images) == test
    assert dm.summary()["test_source"] == "10% held out"


class _FakeTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size, self.current_epoch = rank, world, 0


def test_global_batch_is_divided_over_ranks_and_capped(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10)
    dm = ImageFolderDataModule(str(root), val_fraction=0.2, test_fraction=0.0, batch_size=16,
                               cache_dir=str(tmp_path / "c"))
    dm.prepare()
    dm.trainer = _FakeTrainer(1, 4)
    assert dm.rank_batch_size() == 4  # global 16 over 4 ranks
    dm.settings.batch_size = 512  # far more than the 32 training images: one batch of all of them, not zero batches
    dm.trainer = _FakeTrainer(0, 1)
    assert dm.rank_batch_size() == 32 and len(dm.train_dataloader()) == 1


def test_each_rank_draws_its_own_augmentation(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=10)
    crops = []
    for rank in (0, 1):
        dm = ImageFolderDataModule(str(root), cache_dir=str(tmp_path / "c"), test_fraction=0.0)
        dm.trainer = None
        dm.prepare()
        dm._rank = lambda rank=rank: (rank, 2)  # noqa: E731
        dm.setup("fit")
        crops.append(torch.randint(0, 1000, (8,), generator=dm.augment_generator))
    assert not torch.equal(crops[0], crops[1])


def test_validation_shards_are_not_padded_with_repeats():
    labels = torch.arange(101)
    images = torch.zeros(101, 3, 2, 2, dtype=torch.uint8)
    shards = [torch.cat([y for _, y in TensorBatches(images, labels, 16, False, rank=r, world_size=2)])
              for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == list(range(101))


def test_resume_only_matches_the_same_config(toy_folder, isolated_project):
    from pipeline.config import resolve_config
    from pipeline.runs import config_digest

    cpu = resolve_config("resnet", "cpu")
    gpu = resolve_config("resnet", "gpu")
    assert config_digest(cpu, "abc") == config_digest(resolve_config("resnet", "cpu"), "abc")
    assert config_digest(cpu, "abc") != config_digest(gpu, "abc")
    assert config_digest(cpu, "abc") != config_digest(cpu, "abd")


def test_sqlite_across_nodes_is_refused_in_one_sentence(isolated_project):
    from pipeline.tracking import TrackingError, setup_tracking

    with pytest.raises(TrackingError, match="2 nodes cannot share the sqlite store"):
        setup_tracking("cifar4", nodes=2)
    assert not (isolated_project / "mlflow.db").exists()


def test_non_zero_ranks_wait_for_rank_zero_to_create_the_store(isolated_project, monkeypatch):
    from pipeline.tracking import TrackingError, setup_tracking

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrackingError, match="Rank 1 waited"):
        setup_tracking("cifar4", wait_s=0.5)
    monkeypatch.setenv("RANK", "0")
    _, experiment_id = setup_tracking("cifar4")
    monkeypatch.setenv("RANK", "1")
    assert setup_tracking("cifar4", wait_s=5)[1] == experiment_id


def test_a_gpu_torch_cannot_use_is_named(monkeypatch, tmp_path):
    import pipeline.hardware as hardware

    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    message = hardware.unusable_gpu()
    assert message and "cannot use it" in message and "CPU recipe" in message
    monkeypatch.setattr(hardware.shutil, "which", lambda name: None)
    monkeypatch.setattr(hardware, "Path", lambda p: tmp_path / "no-such-device")
    assert hardware.unusable_gpu() is None


def test_bf16_is_not_chosen_where_it_is_only_emulated(monkeypatch):
    import pipeline.hardware as hardware

    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation)  # a V100: emulation only
    assert hardware.auto_precision("gpu") == "16-mixed"


def test_a_cpu_trains_in_bf16_only_where_bf16_measures_faster(monkeypatch):
    # Two 2-core machines with AVX512-BF16: bf16 trained 1.8x faster on one and 25-30% slower on the other.
    import pipeline.hardware as hardware

    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 0.62)
    assert hardware.auto_precision("cpu") == "32-true"
    assert "0.62x fp32's speed" in hardware.cpu_precision_note()
    monkeypatch.setattr(hardware, "cpu_bf16_speedup", lambda: 1.8)
    assert hardware.auto_precision("cpu") == "bf16-mixed"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.auto_precision("cpu") == "32-true" and hardware.cpu_precision_note() == ""


def test_cutout_blanks_one_square_per_image_with_the_fill():
    from pipeline.data import cutout_batch

    images = torch.ones(64, 3, 32, 32)
    out = cutout_batch(images, 8, torch.tensor([0.1, 0.2, 0.3]), torch.Generator().manual_seed(0))
    blanked = (out[:, 0] == 0.1).sum((1, 2))
    assert blanked.max() == 64 and blanked.min() > 0  # a full 8x8 square, or its part inside the image
    assert torch.equal(out[:, 1] == 0.2, out[:, 0] == 0.1) and ((out == 1) | (out < 0.5)).all()


@pytest.mark.slow
def test_the_whitening_bias_learns_for_its_epochs_then_stays_fixed(toy_folder, isolated_project):
    """The freeze is a zero learning rate for that one parameter (DDP-safe), not requires_grad."""
    import lightning as L

    from pipeline.config import resolve_config
    from pipeline.data import ImageFolderDataModule
    from pipeline.module import LitClassifier

    config = resolve_config("resnet", "cpu", ["model.args.widths=[8,16,16]", "data.batch_size=32",
                                               "optim.whiten_bias_epochs=2", "trainer.max_epochs=4"])
    dm = ImageFolderDataModule(str(toy_folder), config.data)
    module = LitClassifier.from_config(config, dm)
    seen = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append(pl_module.model.net.whiten.bias.detach().clone())

    trainer = L.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()],
                        num_sanity_val_steps=0)
    start = module.model.net.whiten.bias.detach().clone()
    trainer.fit(module, datamodule=dm)
    assert module.model.net.whiten.bias.requires_grad
    assert not torch.equal(seen[0], start) and not torch.equal(seen[1], seen[0])  # epochs 1 and 2 learn
    # Lookahead may still pull the net towards its average, but no optimiser step moves the bias after epoch 2.
    optimizer = trainer.optimizers[0]
    assert optimizer.param_groups[-1]["params"][0] is module.model.net.whiten.bias
    assert optimizer.param_groups[-1]["lr"] == 0.0 and optimizer.param_groups[0]["lr"] > 0


def test_muon_orthogonalises_the_filter_step_and_keeps_the_rest_sgd():
    import torch

    from pipeline.recipe import MuonSGD, orthogonalize

    torch.manual_seed(0)
    grad = torch.randn(16, 27)
    singular = torch.linalg.svdvals(orthogonalize(grad).float())
    assert 0.3 < singular.min() and singular.max() < 1.6  # near-orthogonal, whatever the gradient's scale
    filters, bias = torch.nn.Parameter(torch.randn(16, 3, 3, 3)), torch.nn.Parameter(torch.zeros(16))
    optimizer = MuonSGD([{"params": [filters], "lr": 0.1, "momentum": 0.6, "weight_decay": 0.0, "muon": True},
                         {"params": [bias], "lr": 0.5}], momentum=0.9, nesterov=True)
    filters.grad, bias.grad = 1000 * torch.randn_like(filters), torch.ones(16)
    before = filters.detach().clone()
    optimizer.step()
    normalised = before * (16 ** 0.5 / before.norm())
    assert (filters.detach() - normalised).norm() < 0.1 * 1.6 * 16 ** 0.5  # a bounded step, not 1000x the gradient
    torch.testing.assert_close(bias.detach(), torch.full((16,), -0.95))  # SGD-Nesterov: -lr (g + 0.9 g) at the first step
    assert "momentum_buffer" in optimizer.state[filters] and "momentum_buffer" in optimizer.state[bias]
