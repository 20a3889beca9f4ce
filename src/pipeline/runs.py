"""The data a run used, as MLflow dataset inputs: the UI's Datasets column shows which runs share data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.tracking import MlflowClient


class ImageFolderDataset(MetaDataset):
    """A folder of class subfolders: its fingerprint is the digest, counts per class are the profile."""

    def __init__(self, folder: str | Path, name: str, digest: str, counts: dict[str, int]) -> None:
        self._counts = dict(counts)
        super().__init__(resolve_dataset_source(Path(folder).resolve().as_uri()), name=name, digest=digest)

    @property
    def profile(self) -> Any:
        return {"images": sum(self._counts.values()), "per_class": self._counts}

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self.profile)
        return config


def log_split_inputs(client: MlflowClient, run_id: str, folder: str | Path, fingerprint: str,
                     splits: dict[str, dict[str, int]]) -> None:
    """One dataset input per split (context ``training``, ``validation``, ``test``), counts per class."""
    name = Path(folder).resolve().name
    inputs = [DatasetInput(ImageFolderDataset(folder, f"{name}-{split}", fingerprint, counts)._to_mlflow_entity(),
                           tags=[InputTag("mlflow.data.context", split)])
              for split, counts in splits.items() if counts]
    client.log_inputs(run_id, datasets=inputs)
