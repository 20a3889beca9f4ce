from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from toy_data import make_image_folder  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_project(tmp_path, monkeypatch):
    """Every test gets its own project folder, cache and no inherited tracking URI."""
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory) -> Path:
    """240 learnable images: one coloured shape per class, JPEG and PNG."""
    return make_image_folder(tmp_path_factory.mktemp("toy") / "images", per_class=60)
