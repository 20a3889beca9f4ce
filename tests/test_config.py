import pytest

from pipeline.config import available_models, flatten, resolve_config


def test_every_family_has_a_config():
    assert set(available_models()) >= {"lenet", "vgg", "resnet"}


def test_profile_block_and_overrides_win():
    cpu = resolve_config("resnet", "cpu")
    gpu = resolve_config("resnet", "gpu", ["data.batch_size=64", "trainer.max_epochs=3"])
    assert cpu["model"]["args"]["widths"] == [64, 128, 256] and gpu["model"]["args"]["widths"] == [128, 256, 512]
    assert cpu["trainer"]["accelerator"] == "cpu" and gpu["trainer"]["precision"] == "auto"
    assert gpu["data"]["batch_size"] == 64 and gpu["trainer"]["max_epochs"] == 3
    assert "gpu" not in cpu and "cpu" not in gpu
    assert flatten(cpu)["model.args.variant"] == "resnet9" and cpu["optim"]["recipe"] == "airbench"


def test_unknown_family_and_bad_override():
    with pytest.raises(ValueError, match="Unknown model family 'alexnet'"):
        resolve_config("alexnet", "cpu")
    with pytest.raises(ValueError, match="key.path=value"):
        resolve_config("lenet", "cpu", ["epochs"])
