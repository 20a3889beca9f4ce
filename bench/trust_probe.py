"""Recipe tries for trustworthy answers: train one family (no MLflow), dump what its answers look like.

    .venv/bin/python bench/trust_probe.py --data DIR --family resnet --out probe.npz [--set key=value ...]

Saves, for the last weights: logits and penultimate features for the validation and test splits, for
``--photos`` (ImageFolder) and ``--other`` (flat) folders in two views (full frame, centre 3/4), and
features of the training split. ``--analyse probe.npz ...`` prints accuracy, calibration and
out-of-scope figures for each file side by side. Recipe choices are read on validation; the photos
figures it prints are development-set figures (see PHOTOS.md in the data folder).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def _views(images64: "torch.Tensor", size: int) -> list["torch.Tensor"]:
    import torch.nn.functional as F

    x = images64.float() / 255
    full = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    side = images64.shape[-1]
    cut = side // 8
    centre = x[..., cut : side - cut, cut : side - cut]
    centre = F.interpolate(centre, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return [full, centre]


def train_and_dump(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from pipeline.config import resolve_config
    from pipeline.data import load_image_folder
    from pipeline.module import split_head
    from pipeline.data import ImageFolderDataModule
    from pipeline.hardware import auto_precision
    from pipeline.module import LitClassifier

    config = resolve_config(args.family, "cpu", list(args.set or []) + ([f"seed={args.seed}"] if args.seed is not None
                                                                          else []))
    L.seed_everything(config.seed, workers=True, verbose=False)
    dm = ImageFolderDataModule(args.data, config.data)
    module = LitClassifier.from_config(config, dm)
    trainer_args = config.trainer.arguments()
    trainer_args["precision"] = auto_precision("cpu")
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, **trainer_args)
    started = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - started
    classifier = module.model.eval().float()
    out: dict[str, np.ndarray] = {"seconds": np.array(seconds), "classes": np.array(dm.classes)}

    def run(name: str, images: torch.Tensor, labels=None, floats: bool = False) -> None:
        logits, feats = [], []
        with torch.inference_mode():
            for start in range(0, len(images), 500):
                batch = images[start : start + 500]
                batch = batch if floats else batch.float() / 255
                logits.append(classifier(batch))
                feats.append(split_head(classifier.net)[0]((batch - classifier.mean) / classifier.std))
        out[f"{name}_logits"] = torch.cat(logits).numpy()
        out[f"{name}_feats"] = torch.cat(feats).numpy().astype(np.float16)
        if labels is not None:
            out[f"{name}_labels"] = np.asarray(labels)

    run("val", dm.val_images, dm.val_labels.numpy())
    run("test", dm.test_images, dm.test_labels.numpy())
    run("train", dm.train_images[:: max(1, len(dm.train_images) // 8000)])
    if args.photos:
        photos = load_image_folder(args.photos, 64)
        for i, view in enumerate(_views(photos.images, 32)):
            run(f"photos{i}", view, photos.labels.numpy(), floats=True)
    if args.other:
        from pipeline.runtime.imaging import decode_image

        files = sorted(Path(args.other).rglob("*.JPEG"))
        other = torch.from_numpy(np.stack([decode_image(f, 64) for f in files]))
        for i, view in enumerate(_views(other, 32)):
            run(f"other{i}", view, floats=True)
    np.savez_compressed(args.out, **out)
    torch.save(classifier.state_dict(), Path(args.out).with_suffix(".pt"))
    val_acc = (out["val_logits"].argmax(1) == out["val_labels"]).mean()
    print(f"{args.out}: {seconds:.0f} s, val acc {val_acc:.4f}")


def analyse(paths: list[str]) -> None:
    from pipeline.calibration import calibration_scores, fit_temperature
    from pipeline.evaluation import auroc, fpr_at_tpr
    from pipeline.scope import knn_scores

    def softmax(z):
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    for path in paths:
        d = np.load(path)
        print(f"== {path} ({float(d['seconds']):.0f} s)")
        t = fit_temperature(d["val_logits"], d["val_labels"])
        for split in ("val", "test"):
            labels = d[f"{split}_labels"]
            raw = calibration_scores(softmax(d[f"{split}_logits"]), labels)
            cal = calibration_scores(softmax(d[f"{split}_logits"] / t), labels)
            print(f"  {split}: acc {raw['acc']:.4f}  ECE {raw['ece']:.4f} -> {cal['ece']:.4f} (T={t:.3f})  "
                  f"NLL {raw['nll']:.4f} -> {cal['nll']:.4f}")
        if "photos0_logits" in d:
            labels = d["photos0_labels"]
            for name, logits in (("full", d["photos0_logits"]), ("centre", d["photos1_logits"]),
                                 ("both", (d["photos0_logits"] + d["photos1_logits"]) / 2)):
                pred = logits.argmax(1)
                per_class = [float((pred[labels == k] == k).mean()) for k in range(4)]
                cal = calibration_scores(softmax(logits / t), labels)
                print(f"  photos {name}: acc {np.mean(pred == labels):.4f} balanced {np.mean(per_class):.4f} "
                      f"{' '.join(f'{p:.2f}' for p in per_class)}  ECE {cal['ece']:.4f}")
        if "other0_logits" not in d:
            continue
        bank = d["train_feats"].astype(np.float32)
        sets = {"test": ("test",), "photos": ("photos0", "photos1"), "other": ("other0", "other1")}
        for k in (1, 10, 50):
            s = {name: np.mean([knn_scores(bank, d[f"{v}_feats"].astype(np.float32), k) for v in views], 0)
                 for name, views in sets.items()}
            print(f"  kNN k={k}: AUROC test/other {auroc(s['test'], s['other']):.4f}  "
                  f"photos/other {auroc(s['photos'], s['other']):.4f}  "
                  f"FPR@95 test {fpr_at_tpr(s['test'], s['other']):.3f}")
        for name, fn in (("maxprob", lambda z: -softmax(z / t).max(1)),
                         ("energy", lambda z: -np.log(np.exp(z / t).sum(1)))):
            s = {n: np.mean([fn(d[f"{v}_logits"]) for v in views], 0) for n, views in sets.items()}
            print(f"  {name}: AUROC test/other {auroc(s['test'], s['other']):.4f}  "
                  f"photos/other {auroc(s['photos'], s['other']):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data")
    parser.add_argument("--family", default="resnet")
    parser.add_argument("--set", action="append")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--photos")
    parser.add_argument("--other")
    parser.add_argument("--out")
    parser.add_argument("--analyse", nargs="+")
    args = parser.parse_args()
    if args.analyse:
        analyse(args.analyse)
    else:
        train_and_dump(args)


if __name__ == "__main__":
    main()
