"""`pipeline sweep`: an Optuna study whose trials are nested MLflow runs, resumable, with a pruner."""

from types import SimpleNamespace

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.sweep import PruneOnValAcc, load_space
from pipeline.errors import ConfigError


def test_pruner_stops_a_trial_below_the_median():
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    good = study.ask()
    good.report(0.9, step=0)
    study.tell(good, 0.9)
    callback = PruneOnValAcc(study.ask())
    trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": torch.tensor(0.3)},
                              current_epoch=0, should_stop=False)
    callback.on_validation_end(trainer, None)
    assert callback.pruned and trainer.should_stop


def test_search_spaces_name_real_config_keys(tmp_path):
    for family in ("lenet", "vgg", "resnet"):
        params, _ = load_space(family, fixed_epochs=False)
        # Muon's rate is searched where the family's recipe uses Muon (VGG and ResNet), and only there.
        muon = {"optim.muon_lr"} if family in ("vgg", "resnet") else set()
        assert {"optim.lr", "optim.weight_decay", "optim.label_smoothing", "data.batch_size",
                "trainer.max_epochs"} | muon == set(params)
        assert "trainer.max_epochs" not in load_space(family, fixed_epochs=True)[0]
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "lenet.yaml").write_text("params:\n  optim.lrr: {float: [0.1, 1]}\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_space("lenet", False, tmp_path)


@pytest.mark.slow
def test_three_trial_sweep_gives_nested_runs_a_best_trial_and_resumes(toy_folder, isolated_project, capsys):
    args = ["sweep", "--family", "lenet", "--trials", "3", "--epochs", "1", "--data", str(toy_folder),
            "--set", "tracking.system_metrics_interval_s=0.5"]
    assert main(args) == 0
    client = MlflowClient(f"sqlite:///{isolated_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cifar4").experiment_id
    parents = client.search_runs([experiment], "tags.kind = 'sweep'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == 3 and all(t.data.params["trainer.max_epochs"] == "1" for t in trials)
    assert len({t.data.params["optim.lr"] for t in trials}) == 3  # each trial drew its own learning rate
    top = max(t.data.metrics["best_val_acc"] for t in trials)
    best = next(t for t in trials if t.info.run_id == parent.data.tags["best_trial_run_id"])
    assert best.data.metrics["best_val_acc"] == pytest.approx(top) == parent.data.metrics["best_trial_val_acc"]
    assert float(parent.data.params["best.optim.lr"]) == pytest.approx(float(best.data.params["optim.lr"]))
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/optimization_history.png", "sweep/param_importances.png"} <= plots
    # The best trial becomes the champion through make train's rule.
    champion = client.get_model_version_by_alias("cifar4-classifier", "champion")
    assert client.get_run(champion.run_id).data.metrics["best_val_acc"] == pytest.approx(top)

    # A sweep killed mid-trial leaves that trial RUNNING in optuna.db: the next start runs it again.
    study = optuna.load_study(study_name="cifar4-lenet-cpu-1ep", storage=f"sqlite:///{isolated_project / 'optuna.db'}")
    cut_off = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.2, log=True)})
    capsys.readouterr()
    assert main([*args[:4], "4", *args[5:]]) == 0
    assert "3 trial(s) done, 1 to run, 1 cut-off trial(s) queued again" in capsys.readouterr().out
    rerun = study.get_trials()[-1]
    assert rerun.state == optuna.trial.TrialState.COMPLETE and rerun.params["optim.lr"] == cut_off.params["optim.lr"]
