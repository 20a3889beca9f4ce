"""The ``pipeline`` command: train, sweep, evaluate, predict, download, champion, package, classify."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.config import tracking_defaults
from pipeline.console import console, errors

DEFAULT_DATA = Path("data") / "cifar4"


def outlier_folders(text: str) -> list[str]:
    """``--outliers A,B``: each an existing folder (one sentence naming the one that is not)."""
    from pipeline.errors import DataError

    folders = [part.strip() for part in text.split(",") if part.strip()]
    for folder in folders:
        if not Path(folder).expanduser().is_dir():
            raise DataError(f"Outlier folder {folder!r} does not exist or is not a folder.")
    return folders


def _train(args: argparse.Namespace) -> int:
    from lightning.pytorch.utilities import rank_zero_only

    from pipeline.config import available_models
    from pipeline.data import check_data_folders
    from pipeline.hardware import choose_profile, unusable_gpu
    from pipeline.train import train_families

    families = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else available_models()
    overrides = list(args.set or [])
    data_dir, sources = args.data, args.data
    if data_dir is None:  # data.sources of the config (with their weights and exclusions), else CIFAR-10
        from pipeline.config import resolve_config

        sources = resolve_config(families[0], choose_profile(args.profile), overrides).data.sources
        data_dir = ""  # the data module reads data.sources itself
    if not sources:
        data_dir = sources = str(DEFAULT_DATA)
        if not (DEFAULT_DATA / "train").is_dir():
            from pipeline.download import download_cifar4

            console.print(f"No --data given: downloading CIFAR-10's bird, boat, cat, dog into {data_dir}")
            download_cifar4(DEFAULT_DATA)
    check_data_folders(sources)  # fail before anything else when a folder is wrong
    if args.profile == "auto" and (problem := unusable_gpu()) and rank_zero_only.rank == 0:
        errors.print(f"[bold yellow]warning:[/] {problem}", highlight=False)
    if args.epochs is not None:
        overrides.append(f"trainer.max_epochs={args.epochs}")
    if args.outliers:
        overrides.append(f"data.outliers={json.dumps(outlier_folders(args.outliers))}")
    train_families(families, choose_profile(args.profile), data_dir, overrides, resume=args.resume,
                   experiment=args.experiment, registered_model=args.registered_model)
    return 0


def _config(args: argparse.Namespace) -> int:
    from rich.table import Table

    from pipeline.config import describe, resolve_with_origins

    config, origins = resolve_with_origins(args.family, args.profile, list(args.set or []))
    table = Table(title=f"{args.family} on the {args.profile} profile: the config a run would get")
    for column in ("key", "value", "from", "meaning"):
        table.add_column(column, overflow="fold")
    for key, value, where, meaning in describe(config, origins):
        if not args.changed or where != "default":
            table.add_row(key, json.dumps(value), where, meaning)
    console.print(table)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pipeline.champion import crown
    from pipeline.config import resolve_config
    from pipeline.data import check_data_folders
    from pipeline.hardware import choose_profile
    from pipeline.sweep import run_sweep
    from pipeline.tracking import setup_tracking

    data_dir = args.data or str(DEFAULT_DATA)
    check_data_folders(data_dir)
    profile = choose_profile(args.profile)
    base = resolve_config(args.family, profile, list(args.set or []))
    experiment = args.experiment or base.tracking.experiment
    uri, experiment_id = setup_tracking(experiment)
    result = run_sweep(args.family, args.trials, profile, data_dir, experiment, experiment_id, uri,
                       list(args.set or []), epochs=args.epochs, study_name=args.study, console=console)
    console.print(f"Sweep [bold]{result.study}[/]: {result.completed} trial(s) complete, {result.pruned} pruned; "
                  + (f"best trial {result.best_trial}, val acc {result.best_value:.4f}, run {result.best_run_id}, "
                     f"params {result.best_params}" if result.best_trial is not None else "no complete trial")
                  + f". Parent run {result.parent_run_id}.")
    # The same step as `make train`: the best finished run of the experiment becomes the champion.
    crown(uri, experiment_id, base.tracking.registered_model, base.tracking.alias, console)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate_model

    evaluate_model(args.model, args.data, args.log, args.experiment)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import mlflow

    from pipeline.predict import predict_folder
    from pipeline.runtime.model_uri import parse_model_uri
    from pipeline.runtime.onnx_model import OnnxClassifier
    from pipeline.tracking import check_tracking, tracking_uri

    uri = tracking_uri()
    check_tracking(uri)
    mlflow.set_tracking_uri(uri)
    parsed = parse_model_uri(args.model)
    if parsed is not None and parsed.name is not None:
        from mlflow.tracking import MlflowClient

        from pipeline.packaging import resolve_version

        resolve_version(MlflowClient(uri), args.model)  # a missing name or alias is one sentence, not a traceback
    model = OnnxClassifier.from_mlflow(args.model, threads=args.threads)
    result = predict_folder(model, args.folder, args.out, threads=args.threads)
    console.print(f"{args.model}: {result.files - result.failed:,} of {result.files:,} images classified in "
                  f"{result.seconds:.1f} s ({result.images_per_second:,.0f} img/s) -> {result.out}"
                  + (f"; [yellow]{result.failed} could not be read[/] (see the error column)" if result.failed
                     else ""))
    return 0


def _download(args: argparse.Namespace) -> int:
    if args.photos:
        from pipeline.download_photos import download_photos

        out = args.out if args.out != str(DEFAULT_DATA) else "data"
        written = download_photos(out, args.archive, cifar=not args.no_cifar)
        console.print(f"Wrote {written['photos-train']:,} photos to {Path(out) / 'photos-train'} and "
                      f"{written['outliers-train']:,} out-of-scope images to {Path(out) / 'outliers-train'} "
                      "(Tiny-ImageNet: ImageNet's terms, non-commercial research and education only)")
        return 0
    from pipeline.download import download_cifar4

    console.print(f"Wrote {download_cifar4(args.out)}")
    return 0


def _champion(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.champion import crown
    from pipeline.tracking import setup_tracking

    uri, experiment_id = setup_tracking(args.experiment)
    if args.version is not None:
        from pipeline.champion import move_alias

        console.print(move_alias(MlflowClient(uri), args.registered_model, args.alias, args.version))
        return 0
    crown(uri, experiment_id, args.registered_model, args.alias, console)
    return 0


def _package(args: argparse.Namespace) -> int:
    from pipeline.packaging import package
    from pipeline.tracking import tracking_uri

    result = package(args.model, tracking_uri(), build=not args.no_build)
    console.print(f"{args.model} = {result.registered_model} version {result.version} -> BentoML model "
                  f"[bold]{result.bento_model}[/] (ONNX vs torch max diff {result.max_abs_diff:.1e}; "
                  f"explain graph's Grad-CAM vs autograd {result.gradcam_rel_diff:.1e} relative)"
                  + (f", bento [bold]{result.bento}[/]" if result.bento else ""))
    return 0


def _classify(args: argparse.Namespace) -> int:
    import mimetypes

    import httpx
    from rich.table import Table

    table = Table(title=f"{args.url}/classify")
    for column in ("file", "label", "probability", "out of scope", "all probabilities"):
        table.add_column(column)
    failed = 0
    with httpx.Client(base_url=args.url, timeout=60) as client:
        for path in args.images:
            try:
                with open(path, "rb") as handle:
                    kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
                    response = client.post("/classify", files={"image": (Path(path).name, handle, kind)})
                body = response.json()
            except (OSError, httpx.HTTPError, ValueError) as error:
                table.add_row(path, "[red]error[/]", "", "", str(error))
                failed += 1
                continue
            if response.status_code != 200:
                table.add_row(path, f"[red]{response.status_code}[/]", "", "", body.get("error", ""))
                failed += 1
                continue
            ranked = sorted(body["probabilities"].items(), key=lambda kv: -kv[1])
            scope = body.get("out_of_scope")
            table.add_row(path, body["label"], f"{ranked[0][1]:.2f}",
                          "" if scope is None else f"{'[yellow]yes[/]' if scope else 'no'} "
                                                   f"({body['out_of_scope_score']:.3f})",
                          "  ".join(f"{name} {p:.2f}" for name, p in ranked))
    console.print(table)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    defaults = tracking_defaults()
    champion_uri = f"models:/{defaults['registered_model']}@{defaults['alias']}"
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train model families, log to MLflow, register the champion")
    train.add_argument("--data", help="image folder: DIR/<class>/*.jpg or DIR/{train,test}/<class>/*.jpg, or several "
                                      "joined by commas (A,B; A:2 samples A twice per epoch), each split on its own "
                                      f"(default: data.sources, else {DEFAULT_DATA}, downloaded when missing)")
    train.add_argument("--outliers", help="folders of out-of-scope images (any names, any depth), joined by commas: "
                                          "each training step also learns 'none of these' from them (data.outliers)")
    train.add_argument("--models", help="comma-separated families (default: every configs/model/*.yaml)")
    train.add_argument("--profile", default="auto", choices=["auto", "cpu", "gpu"],
                       help="configs/profile/<name>.yaml; auto picks gpu when CUDA is available")
    train.add_argument("--epochs", type=int, help="override trainer.max_epochs for every family")
    train.add_argument("--set", action="append", metavar="KEY=VALUE",
                       help="override any config value, e.g. --set data.batch_size=256 (repeatable)")
    train.add_argument("--resume", action="store_true",
                       help="continue the newest unfinished run of each family from its last checkpoint")
    train.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment in configs)")
    train.add_argument("--registered-model", help="registry name (default: tracking.registered_model)")
    train.set_defaults(func=_train)

    show = sub.add_parser("config", help="print a family's resolved config: every key, its value, where it came from")
    show.add_argument("family", help="a model family (configs/model/<family>.yaml)")
    show.add_argument("--profile", default="cpu", choices=["cpu", "gpu"], help="configs/profile/<name>.yaml")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="an override, as for train (repeatable)")
    show.add_argument("--changed", action="store_true", help="only the keys a file or --set sets")
    show.set_defaults(func=_config)

    sweep = sub.add_parser("sweep", help="Optuna search over a family's hyperparameters, trials as nested MLflow runs")
    sweep.add_argument("--family", required=True, help="configs/model/<family>.yaml, with configs/sweep/<family>.yaml")
    sweep.add_argument("--trials", type=int, default=20, help="trials the study should have in all (kills resume)")
    sweep.add_argument("--epochs", type=int, help="fix trainer.max_epochs (otherwise it is searched)")
    sweep.add_argument("--data", help=f"image folder (default: {DEFAULT_DATA})")
    sweep.add_argument("--profile", default="auto", choices=["auto", "cpu", "gpu"])
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed overrides for every trial")
    sweep.add_argument("--study", help="Optuna study name (default: EXPERIMENT-FAMILY-PROFILE[-Nep])")
    sweep.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment in configs)")
    sweep.set_defaults(func=_sweep)

    evaluate = sub.add_parser("evaluate", help="score a registered model on an image folder")
    evaluate.add_argument("--data", required=True, help="image folder (its test/ split when it has one)")
    evaluate.add_argument("--model", default=champion_uri, help="MLflow model URI")
    evaluate.add_argument("--log", action="store_true", help="log the scores and confusion matrix to MLflow")
    evaluate.add_argument("--experiment", default=f"{defaults['experiment']}-evaluations")
    evaluate.set_defaults(func=_evaluate)

    predict = sub.add_parser("predict", help="classify every image under a folder offline, write a CSV")
    predict.add_argument("folder", help="folder of images, searched recursively (no labels needed)")
    predict.add_argument("--model", default=champion_uri, help="MLflow model URI")
    predict.add_argument("--out", default="predictions.csv", help="CSV: path, label, one column per class, error")
    predict.add_argument("--threads", type=int, default=2, help="decode and ONNX Runtime threads")
    predict.set_defaults(func=_predict)

    download = sub.add_parser("download", help="download CIFAR-10 and write bird/boat/cat/dog folders; --photos: "
                                               "Tiny-ImageNet's photos-train and outliers-train")
    download.add_argument("--out", default=str(DEFAULT_DATA), help=f"default {DEFAULT_DATA}; with --photos, data/")
    download.add_argument("--photos", action="store_true",
                          help="Tiny-ImageNet photos of the four classes and of other things (configs/photos.yaml; "
                               "ImageNet terms: non-commercial research and education only)")
    download.add_argument("--archive", help="with --photos: a local tiny-imagenet-200.zip or its unpacked folder")
    download.add_argument("--no-cifar", action="store_true",
                          help="with --photos: leave CIFAR-10's other classes out of outliers-train")
    download.set_defaults(func=_download)

    champion = sub.add_parser("champion", help="re-run the champion selection over an experiment's runs")
    champion.add_argument("--experiment", default=defaults["experiment"])
    champion.add_argument("--registered-model", default=defaults["registered_model"])
    champion.add_argument("--alias", default=defaults["alias"])
    champion.add_argument("--version", help="point the alias at this registered version (promote or roll back "
                                            "by hand) instead of choosing the best run")
    champion.set_defaults(func=_champion)

    pack = sub.add_parser("package", help="store a registered model in BentoML and build the bento")
    pack.add_argument("--model", default=champion_uri,
                      help="models:/NAME@ALIAS or models:/NAME/VERSION")
    pack.add_argument("--no-build", action="store_true", help="store the BentoML model only, skip `bentoml build`")
    pack.set_defaults(func=_package)

    classify = sub.add_parser("classify", help="send images to a running service and print a table")
    classify.add_argument("images", nargs="+", help="image files")
    classify.add_argument("--url", default="http://127.0.0.1:3000")
    classify.set_defaults(func=_classify)
    return parser


def quiet_known_noise() -> None:
    """Drop advice and warnings that do not apply to this project's setup."""
    import logging
    import warnings

    class DropAdverts(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(DropAdverts())
    for pattern in (".*LeafSpec.*", ".*smaller than the logging interval.*", ".*does not have many workers.*",
                    ".*CUDAExecutionProvider.*", ".*can be interpreted in multiple ways.*"):
        warnings.filterwarnings("ignore", message=pattern)


def main(argv: list[str] | None = None) -> int:
    # MLflow's download progress bars fill logs and CI output with carriage-return lines.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    args = build_parser().parse_args(argv)
    quiet_known_noise()
    from mlflow.exceptions import MlflowException

    from pipeline.errors import ConfigError, DataError
    from pipeline.runtime.model_folder import ModelError
    from pipeline.tracking import TrackingError

    try:
        return args.func(args)
    except (DataError, ConfigError, TrackingError, ModelError) as error:
        errors.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    except MlflowException as error:
        from pipeline.tracking import tracking_uri

        first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        errors.print(f"[bold red]error:[/] MLflow at {tracking_uri()} failed: {first_line}. Checkpoints are kept in "
                     "checkpoints/; once MLflow answers again, continue with `make train RESUME=1`.", highlight=False)
        return 3
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: resume with `pipeline train --resume` (make train RESUME=1)")
        return 130


if __name__ == "__main__":
    sys.exit(main())
