"""Every ``CLASSIFIER_*`` setting of the service, read from the environment once and checked.

A bad value stops the service at start with one sentence naming the variable, the value and
what it must be. Unknown ``CLASSIFIER_*`` names are refused too: a typo is not ignored.
Empty values count as unset (docker compose passes empty strings for unset variables).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping, Optional

from pipeline.runtime.model_folder import MAX_PIXELS
from pipeline.runtime.model_uri import parse_alias_uri


class SettingsError(ValueError):
    """A ``CLASSIFIER_*`` variable has a value the service cannot use; the message names it."""


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    model: str = "cifar4-classifier:latest"   # CLASSIFIER_MODEL: the BentoML model tag to serve
    workers: int = 0                          # CLASSIFIER_WORKERS: 0 = one per core, up to 2
    threads: int = 0                          # CLASSIFIER_THREADS: ONNX Runtime threads; 0 = cores / workers
    ort_spinning: bool = False                # CLASSIFIER_ORT_SPINNING: let idle ORT threads spin
    access_log: bool = False                  # CLASSIFIER_ACCESS_LOG: ~1 ms a request on 2 cores
    trace_routes: bool = False                # CLASSIFIER_TRACE_ROUTES: OpenTelemetry spans on the model routes
    max_body_bytes: int = 10 * 1024 * 1024    # CLASSIFIER_MAX_BODY_BYTES
    max_pixels: int = MAX_PIXELS              # CLASSIFIER_MAX_PIXELS: decoded size limit (decompression bombs)
    max_batch_files: int = 128                # CLASSIFIER_MAX_BATCH_FILES: files in one /classify_batch
    model_batch: int = 16                     # CLASSIFIER_MODEL_BATCH: images in one model call, at most
    read_timeout_s: float = 30.0              # CLASSIFIER_READ_TIMEOUT_S: a body must arrive within this
    drain_bytes: int = 64 * 1024 * 1024       # CLASSIFIER_DRAIN_BYTES: body read and dropped after a 413
    drain_timeout_s: float = 5.0              # CLASSIFIER_DRAIN_TIMEOUT_S: ... for at most this long
    follow: str = ""                          # CLASSIFIER_FOLLOW: models:/NAME@ALIAS to follow (MLFLOW_TRACKING_URI)
    follow_interval_s: float = 30.0           # CLASSIFIER_FOLLOW_INTERVAL_S: how often the alias is checked

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "Settings":
        environ = os.environ if environ is None else environ
        known = {f"CLASSIFIER_{f.name.upper()}": f for f in fields(cls)}
        unknown = sorted(k for k in environ if k.startswith("CLASSIFIER_") and k not in known)
        if unknown:
            raise SettingsError(f"Unknown setting {unknown[0]}: the service reads {', '.join(sorted(known))}.")
        values = {}
        for name, field in known.items():
            raw = environ.get(name, "").strip()
            if raw:
                values[field.name] = _parse(name, raw, field.type)
        settings = cls(**values)
        for name in ("max_body_bytes", "max_pixels", "max_batch_files", "read_timeout_s", "model_batch"):
            if getattr(settings, name) <= 0:
                raise SettingsError(f"CLASSIFIER_{name.upper()}={getattr(settings, name)} must be above 0.")
        if settings.follow:
            if parse_alias_uri(settings.follow) is None:
                raise SettingsError(f"CLASSIFIER_FOLLOW={settings.follow!r} must look like models:/NAME@ALIAS.")
            if not environ.get("MLFLOW_TRACKING_URI", "").startswith(("http://", "https://")):
                raise SettingsError(f"CLASSIFIER_FOLLOW={settings.follow} needs MLFLOW_TRACKING_URI set to the "
                                    "MLflow server's http(s) URL.")
        return settings

    @property
    def worker_count(self) -> int:
        return self.workers or min(2, _cpus())

    @property
    def thread_count(self) -> int:
        return self.threads or max(1, min(4, _cpus() // self.worker_count))


def _parse(name: str, raw: str, kind: str):
    if kind in ("bool", bool):
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name}={raw!r} must be 1/true/yes or 0/false/no.")
    if kind in ("int", int):
        if not raw.isdigit():
            raise SettingsError(f"{name}={raw!r} must be a whole number (0 or more).")
        return int(raw)
    if kind in ("float", float):
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} must be a number of seconds.") from None
        if not value > 0:
            raise SettingsError(f"{name}={raw!r} must be above 0.")
        return value
    return raw
