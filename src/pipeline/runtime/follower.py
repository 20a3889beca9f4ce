"""Follow an MLflow registry alias from the service: plain HTTP to the tracking server, no mlflow package.

``Follower`` checks ``models:/NAME@ALIAS`` every interval. When the alias moves it downloads the
new version's files through the server (``/ajax-api/2.0/mlflow/logged-models/<id>/artifacts/files``,
the MLflow UI's own route, which serves local and proxied artifact stores alike), checks them
against the checksums the training run recorded, refuses a model with other classes or invalid
probabilities on fixed probe images, and only then hands it to the service, which swaps it in
between two model calls. A tracking server that does not answer changes nothing but the status.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.runtime.loader import Served, load_served
from pipeline.runtime.model_folder import CHECKSUM_TAG, MODEL_FILES, ModelError
from pipeline.runtime.model_uri import parse_alias_uri

log = logging.getLogger("bentoml.cifar4.follow")


class RegistryUnreachable(RuntimeError):
    """The tracking server did not answer (``status`` None), or answered with an error status."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Refused(RuntimeError):
    """A model version that must not be served; the message says why."""


class RegistryClient:
    def __init__(self, tracking_uri: str, timeout: float = 10.0) -> None:
        self.base, self.timeout = tracking_uri.rstrip("/"), timeout

    def _get(self, path: str, params: dict[str, str]) -> bytes:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode("utf-8", "replace")
            raise RegistryUnreachable(f"{self.base} answered {error.code} to {path}: {detail}", error.code) from None
        except (urllib.error.URLError, OSError, TimeoutError) as error:
            raise RegistryUnreachable(f"MLflow at {self.base} cannot be reached "
                                      f"({getattr(error, 'reason', error)}).") from None

    def _json(self, path: str, params: dict[str, str]) -> dict:
        try:
            return json.loads(self._get(path, params))
        except ValueError:
            raise RegistryUnreachable(f"{self.base}{path} did not answer JSON.") from None

    def alias(self, name: str, alias: str) -> dict[str, Any]:
        """The version the alias points at: ``version``, ``run_id``, ``model_id``."""
        found = self._json("/api/2.0/mlflow/registered-models/alias", {"name": name, "alias": alias})
        version = found.get("model_version") or {}
        model_id = version.get("model_id") or str(version.get("source", "")).removeprefix("models:/")
        return {"version": str(version.get("version")), "run_id": version.get("run_id", ""), "model_id": model_id}

    def run_tags(self, run_id: str) -> dict[str, str]:
        run = self._json("/api/2.0/mlflow/runs/get", {"run_id": run_id}).get("run", {})
        return {t["key"]: t["value"] for t in run.get("data", {}).get("tags", [])}

    def download(self, model_id: str, name: str, dest: Path) -> bool:
        """Fetch one model file (at the top or in extra_files/); False when the model has no such file."""
        for relative in (name, f"extra_files/{name}"):
            try:
                data = self._get(f"/ajax-api/2.0/mlflow/logged-models/{model_id}/artifacts/files",
                                 {"artifact_file_path": relative})
            except RegistryUnreachable as error:
                if error.status in (400, 404, 500):  # not there (MLflow answers a missing file with one of these)
                    continue
                raise
            dest.write_bytes(data)
            return True
        return False


def load_version(client: RegistryClient, name: str, found: dict[str, Any], scratch: Path, threads: int,
                 spinning: bool, classes: Optional[list[str]]) -> Served:
    """Download, check and load one registered version; raises Refused with the reason."""
    version, run_id, model_id = found["version"], found["run_id"], found["model_id"]
    if not model_id:
        raise Refused(f"version {version} has no logged model to download.")
    recorded = {key[len(CHECKSUM_TAG):]: value for key, value in client.run_tags(run_id).items()
                if key.startswith(CHECKSUM_TAG)}
    if not recorded:
        raise Refused(f"version {version}'s run {run_id} recorded no checksums of its model files (logged before "
                      "this check existed): serve it with `make package` instead.")
    folder = Path(tempfile.mkdtemp(prefix=f"model-v{version}-", dir=scratch))
    try:
        for file in MODEL_FILES:
            if file in recorded and not client.download(model_id, file, folder / file):
                raise Refused(f"version {version} lacks {file}, which its run recorded.")
        try:
            served = load_served(folder, recorded, {"registered_model": name, "model_version": version,
                                                    "run_id": run_id, "mlflow_model_id": model_id},
                                 threads, spinning, classes)
        except ModelError as error:
            raise Refused(f"version {version}: {error}.") from None
        # ONNX Runtime holds both graphs in memory now: the files go (in a container they sit in /dev/shm).
        shutil.rmtree(folder, ignore_errors=True)
        return served
    except Refused:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:  # ONNX Runtime's errors are RuntimeErrors
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(error, RegistryUnreachable):
            raise
        raise Refused(f"version {version} could not be loaded: {str(error)[:300]}") from None


@dataclass
class Follower:
    """Checks the alias every ``interval`` seconds in a thread; ``swap(served)`` installs a new model."""
    target: str
    tracking_uri: str
    interval: float
    swap: Callable[[Served], None]
    threads: int = 1
    spinning: bool = False
    scratch: Path = field(default_factory=lambda: Path(tempfile.gettempdir()))
    current: Optional[Served] = None
    reachable: Optional[bool] = None
    last_check: Optional[float] = None
    last_error: Optional[str] = None
    last_refusal: Optional[dict[str, Any]] = None
    swaps: int = 0
    refusals: int = 0
    on_event: Callable[[str], None] = lambda kind: None  # "swap" or "refusal": the service counts them

    def __post_init__(self) -> None:
        parsed = parse_alias_uri(self.target)
        if parsed is None:
            raise ValueError(f"{self.target!r} must look like models:/NAME@ALIAS.")
        self.name, self.alias = parsed
        self.client = RegistryClient(self.tracking_uri)
        self._thread: Optional[threading.Thread] = None

    def initial(self) -> Served:
        """The model the alias points at now; raises RegistryUnreachable or Refused."""
        found = self.client.alias(self.name, self.alias)
        served = load_version(self.client, self.name, found, self.scratch, self.threads, self.spinning, None)
        self.current, self.reachable, self.last_check = served, True, time.time()
        log.info("Following %s at %s: serving version %s", self.target, self.tracking_uri, found["version"])
        return served

    def check(self) -> None:
        """One look at the alias; never raises."""
        self.last_check = time.time()
        try:
            found = self.client.alias(self.name, self.alias)
        except RegistryUnreachable as error:
            if self.reachable is not False:
                log.warning("%s Still serving version %s; following resumes when it answers.", error,
                            self.current.info.get("model_version") if self.current else None)
            self.reachable, self.last_error = False, str(error)
            return
        if self.reachable is False:
            log.info("MLflow at %s answers again; following %s.", self.tracking_uri, self.target)
        self.reachable, self.last_error = True, None
        served_version = self.current.info.get("model_version") if self.current else None
        if found["version"] == served_version:
            return
        if self.last_refusal and self.last_refusal["version"] == found["version"]:
            return  # refused already: wait for the alias to move again
        classes = self.current.model.classes if self.current else None
        try:
            served = load_version(self.client, self.name, found, self.scratch, self.threads, self.spinning, classes)
        except RegistryUnreachable as error:  # went away mid-download: try again next time
            self.reachable, self.last_error = False, str(error)
            log.warning("%s Still serving version %s.", error, served_version)
            return
        except Refused as error:
            self.refusals += 1
            self.last_refusal = {"version": found["version"], "reason": str(error), "at": time.time()}
            log.error("Refused %s version %s: %s Still serving version %s.", self.name, found["version"], error,
                      served_version)
            self.on_event("refusal")
            return
        self.current = served
        self.swap(served)
        self.swaps += 1
        self.on_event("swap")
        log.info("%s moved: now serving version %s (was %s).", self.target, found["version"], served_version)

    def start(self) -> None:
        def loop() -> None:
            while True:  # a daemon thread: it ends with the worker
                time.sleep(self.interval)
                self.check()

        self._thread = threading.Thread(target=loop, name="follow-registry", daemon=True)
        self._thread.start()

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target, "tracking_uri": self.tracking_uri, "interval_s": self.interval,
            "serving_version": self.current.info.get("model_version") if self.current else None,
            "tracking_server": None if self.reachable is None else ("reachable" if self.reachable else "unreachable"),
            "last_error": self.last_error, "last_check": self.last_check, "last_refusal": self.last_refusal,
            "swaps": self.swaps, "refusals": self.refusals,
        }
