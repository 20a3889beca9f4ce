"""Model families: each registers itself, keeps the explain contract, and a new one is a file plus a YAML."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import config_dir
from pipeline.models import FAMILIES, build_model, discover, load_family_module
from test_visual import trained_like

TOY_FAMILY = '''
from torch import nn

from pipeline.models import register


class Toy(nn.Module):
    """conv -> ReLU -> pool, then a linear layer: the smallest net that keeps the explain contract."""

    def __init__(self, num_classes: int, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.head = [nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
        self.tail = nn.Sequential(*self.head)

    def forward(self, x):
        return self.tail(self.conv(x))

    def explain_stages(self):
        return [("conv", self.conv)]

    def explain_head(self):
        return list(self.head)


@register("toy")
def toy(num_classes: int, **kwargs) -> Toy:
    return Toy(num_classes, **kwargs)
'''


def test_every_family_registers_itself_and_keeps_the_explain_contract():
    """Discovery finds every file in pipeline/models; each family, built with its defaults, shows its stages
    and gives Grad-CAM through the explain graph equal to autograd's."""
    from pipeline.explain_graph import ExplainNet, gradcam_autograd

    families = discover()
    assert {"lenet", "vgg", "resnet"} <= set(families)
    for name in sorted(families):
        classifier = trained_like(name, {})
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            outputs = ExplainNet(classifier)(images)
        reference = gradcam_autograd(classifier, images)
        torch.testing.assert_close(outputs[-1], reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max()))


def test_a_family_that_breaks_the_explain_contract_fails_when_built(tmp_path):
    bad = TOY_FAMILY.replace('@register("toy")', '@register("toy_sigmoid")').replace(
        "nn.Flatten(), nn.Linear(width, num_classes)]", "nn.Flatten(), nn.Sigmoid(), nn.Linear(width, num_classes)]")
    (tmp_path / "bad_family.py").write_text(bad)
    load_family_module(str(tmp_path / "bad_family.py"))
    with pytest.raises(ValueError, match=r"'toy_sigmoid'.*cannot go back through Sigmoid"):
        build_model("toy_sigmoid", 4)
    FAMILIES.pop("toy_sigmoid")


def test_a_new_family_is_one_file_and_one_yaml(tmp_path, toy_folder, isolated_project):
    """A toy family outside the package: its file, its YAML; it trains an epoch, exports, gets a default
    sweep space, and its logged explain graph answers an /explain request."""
    from pipeline.runtime.explainer import Explainer
    from pipeline.runtime.model_folder import EXPLAIN_JSON, locate
    from pipeline.sweep import load_space

    family_file = tmp_path / "toy_family.py"
    family_file.write_text(TOY_FAMILY)
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs, ignore=shutil.ignore_patterns("model", "sweep"))
    (configs / "model").mkdir()
    (configs / "model" / "toy.yaml").write_text(textwrap.dedent(f"""
        model:
          arch: toy
          module: {family_file}
          args: {{width: 6}}
        data: {{batch_size: 32}}
        optim: {{lr: 0.05}}
        trainer: {{max_epochs: 1}}
    """))
    import os

    os.environ["PIPELINE_CONFIG_DIR"] = str(configs)
    try:
        assert main(["train", "--data", str(toy_folder), "--models", "toy", "--profile", "cpu"]) == 0
        from pipeline.config import resolve_config

        params, _ = load_space("toy", False, base=resolve_config("toy", "cpu"))
        assert set(params) == {"optim.lr", "optim.weight_decay", "trainer.max_epochs"}
    finally:
        del os.environ["PIPELINE_CONFIG_DIR"]
        FAMILIES.pop("toy", None)
    mlflow.set_tracking_uri(f"sqlite:///{isolated_project / 'mlflow.db'}")
    folder = Path(mlflow.artifacts.download_artifacts("models:/cifar4-classifier@champion"))
    explainer = Explainer.from_folder(locate(folder, EXPLAIN_JSON).parent, ["bird", "boat", "cat", "dog"])
    image = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    answer = explainer.explain(image, target=2)
    assert [stage["name"] for stage in answer["stages"]] == ["conv"]
    assert answer["saliency"]["class"] == "cat" and answer["saliency"]["stage"] == "conv" and answer["saliency"]["overlay"]
