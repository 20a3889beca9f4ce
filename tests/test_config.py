import dataclasses

import pytest
import yaml

from pipeline.config import available_models, flatten, resolve_config
from pipeline.errors import ConfigError


def test_every_family_has_a_config():
    assert set(available_models()) >= {"lenet", "vgg", "resnet"}


def test_profile_block_and_overrides_win():
    cpu = resolve_config("resnet", "cpu")
    gpu = resolve_config("resnet", "gpu", ["data.batch_size=64", "trainer.max_epochs=3"])
    assert cpu.model.args["widths"] == [64, 128, 256] and gpu.model.args["widths"] == [128, 256, 512]
    assert cpu.trainer.accelerator == "cpu" and gpu.trainer.precision == "auto"
    assert gpu.data.batch_size == 64 and gpu.trainer.max_epochs == 3
    assert "gpu" not in cpu.to_dict() and "cpu" not in gpu.to_dict()
    assert flatten(cpu.to_dict())["model.args.variant"] == "resnet9" and cpu.optim.recipe == "airbench"


def test_unknown_family_and_bad_override():
    with pytest.raises(ValueError, match="Unknown model family 'alexnet'"):
        resolve_config("alexnet", "cpu")
    with pytest.raises(ValueError, match="key.path=value"):
        resolve_config("lenet", "cpu", ["epochs"])


def test_unknown_keys_name_the_closest_known_ones(tmp_path):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Unknown config key optim.lrr: did you mean optim.lr( |\?)"):
        resolve_config("vgg", "cpu", ["optim.lrr=0.05"])
    with pytest.raises(ConfigError, match="Unknown config key tracking.experimnt: did you mean tracking.experiment"):
        resolve_config("vgg", "cpu", ["tracking.experimnt=x"])
    with pytest.raises(ConfigError, match="Config key data.batch_size must be a whole number, got 'big'"):
        resolve_config("vgg", "cpu", ["data.batch_size=big"])
    # The same check covers the YAML files.
    import shutil

    from pipeline.config import config_dir

    shutil.copytree(config_dir(), tmp_path / "configs")
    (tmp_path / "configs" / "model" / "vgg.yaml").write_text("model: {arch: vgg}\ndata: {batch_sise: 64}\n")
    with pytest.raises(ConfigError, match="Unknown config key data.batch_sise: did you mean data.batch_size"):
        resolve_config("vgg", "cpu", directory=tmp_path / "configs")


def test_a_typo_on_the_command_line_is_one_sentence(capsys):
    from pipeline.cli import main

    assert main(["train", "--data", ".", "--models", "lenet", "--set", "optim.lrr=0.05"]) == 2
    err = capsys.readouterr().err
    assert "Unknown config key optim.lrr: did you mean optim.lr" in err and "Traceback" not in err


def test_command_line_numbers_and_whole_sections():
    config = resolve_config("vgg", "cpu", ["optim.weight_decay=5e-4", "model.args={cfg: small}"])
    assert config.optim.weight_decay == 0.0005  # YAML alone would read 5e-4 as text
    assert config.model.args == {"cfg": "small"}  # a whole section replaces the family's


def test_config_checks_import_neither_torch_nor_lightning():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; sys.modules['lightning'] = None; "
            "from pipeline.config import resolve_config; "
            "[resolve_config(f, p) for f in ('lenet', 'vgg', 'resnet') for p in ('cpu', 'gpu')]; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_the_trainer_settings_are_lightning_arguments():
    import inspect

    import lightning as L

    from pipeline.config import TrainerSettings

    accepted = set(inspect.signature(L.Trainer.__init__).parameters)
    own = set(TrainerSettings.OWN)
    assert set(TrainerSettings().arguments()) <= {f.name for f in dataclasses.fields(TrainerSettings)} - own <= accepted
    assert not own & accepted


def test_an_epoch_scale_shortens_every_recipe_but_not_an_explicit_epoch_count():
    from pipeline.config import resolve_config, resolve_with_origins

    recipes = {family: resolve_config(family, "cpu").trainer.max_epochs for family in ("lenet", "vgg", "resnet")}
    for family, epochs in recipes.items():
        config, origins = resolve_with_origins(family, "cpu", ["trainer.epoch_scale=0.6"])
        assert config.trainer.max_epochs == max(1, round(epochs * 0.6)) < epochs
        assert "epoch_scale" in origins["trainer.max_epochs"] and "epoch_scale" not in config.trainer.arguments()
    assert resolve_config("vgg", "cpu", ["trainer.epoch_scale=0.6", "trainer.max_epochs=3"]).trainer.max_epochs == 3
    assert resolve_config("vgg", "cpu", ["trainer.epoch_scale=0.01"]).trainer.max_epochs == 1


def test_no_default_is_written_twice():
    """A setting's default lives in its typed section only: no function of the package gives a parameter with a
    setting's name and type a literal default of its own (reading it from the section, ``DataSettings.flip``,
    is fine), and no YAML file sets a key to the value it would have anyway."""
    import ast
    from pathlib import Path

    import pipeline
    from pipeline.config import SECTIONS, Config, config_dir

    kinds: dict[str, set] = {"seed": {int}}
    for kind in SECTIONS.values():
        for f in dataclasses.fields(kind()):
            kinds.setdefault(f.name, set()).add(type(getattr(kind(), f.name)))
    found = []
    for path in Path(pipeline.__file__).parent.rglob("*.py"):
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                    + node.args.kw_defaults
                for argument, default in zip(arguments, defaults):
                    if argument.arg in kinds and isinstance(default, ast.Constant) and default.value is not None \
                            and type(default.value) in kinds[argument.arg]:
                        found.append(f"{path.name}:{node.lineno} {node.name}({argument.arg}={default.value!r})")
    assert not found, found
    # Each YAML key differs from what the layers below it (the defaults, data.yaml, the profile) give.
    defaults = flatten(Config().to_dict())
    for family in available_models():
        for profile in ("cpu", "gpu"):
            for path in ("data.yaml", f"profile/{profile}.yaml", f"model/{family}.yaml"):
                text = yaml.safe_load((config_dir() / path).read_text()) or {}
                for key, value in flatten({k: v for k, v in text.items() if k not in ("cpu", "gpu")}).items():
                    assert defaults.get(key, object()) != value, f"{path} sets {key} to its default {value!r}"
    assert Config().seed == 42 and resolve_config("resnet", "cpu").seed == 42  # one seed default, 42


def test_config_shows_each_value_and_where_it_came_from(capsys):
    from pipeline.cli import main

    assert main(["config", "lenet", "--set", "data.batch_size=64"]) == 0
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:4]]
            for line in capsys.readouterr().out.splitlines() if line.count("│") >= 4 and line.split("│")[1].strip()}
    assert rows["data.batch_size"] == ["64", "--set"]
    assert rows["trainer.max_epochs"] == ["50", "configs/model/lenet.yaml"]
    assert rows["trainer.accelerator"] == ['"cpu"', "configs/profile/cpu.yaml"]
    assert rows["out_of_scope.keep"] == ["0.95", "default"]


def test_a_wrong_value_names_its_choices_or_interval():
    with pytest.raises(ConfigError, match="Config key out_of_scope.score must be combined or energy or knn"):
        resolve_config("lenet", "cpu", ["out_of_scope.score=mahalanobis"])
    with pytest.raises(ConfigError, match=r"Config key out_of_scope.keep must be in \[0.5, 1\), got 1.5"):
        resolve_config("lenet", "cpu", ["out_of_scope.keep=1.5"])
    with pytest.raises(ConfigError, match="Config key data.flip must be true or false or alternate"):
        resolve_config("lenet", "cpu", ["data.flip=sometimes"])


def test_a_key_set_by_the_profile_and_the_model_is_refused(tmp_path):
    import shutil

    from pipeline.config import config_dir

    shutil.copytree(config_dir(), tmp_path / "configs")
    gpu = tmp_path / "configs" / "profile" / "gpu.yaml"
    gpu.write_text(gpu.read_text().replace("data:\n", "data:\n  batch_size: 1024\n"))
    with pytest.raises(ConfigError, match=r"data.batch_size is set in .*gpu.yaml and in .*\.yaml"):
        resolve_config("vgg", "gpu", directory=tmp_path / "configs")
    assert resolve_config("vgg", "cpu", directory=tmp_path / "configs").data.batch_size == 512


def test_lenet_learning_rate_follows_its_batch():
    """Plain SGD: the GPU block's doubled batch comes with a doubled rate (linear scaling)."""
    cpu, gpu = resolve_config("lenet", "cpu"), resolve_config("lenet", "gpu")
    assert gpu.optim.lr / cpu.optim.lr == gpu.data.batch_size / cpu.data.batch_size == 2


def test_the_classic_resnet_needs_muon_switched_off():
    # ResNet's default recipe updates its filters with Muon, which only the airbench recipe has: asking for plain
    # SGD alone is one sentence that says what to add, and adding it gives the classic recipe.
    classic = ["model.args.variant=cifar", "model.args.depth=20", "optim.recipe=sgd"]
    with pytest.raises(ConfigError, match=r"optim.muon needs optim.recipe airbench.*--set optim.muon=false"):
        resolve_config("resnet", "cpu", classic)
    config = resolve_config("resnet", "cpu", classic + ["optim.muon=false"])
    assert config.optim.recipe == "sgd" and config.optim.muon is False
