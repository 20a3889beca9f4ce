"""Network families. A family registers itself where it is defined:

    from pipeline.models import register

    @register("lenet")
    def lenet(num_classes: int, **kwargs) -> nn.Module: ...

Every module in this package is imported on first use, so a new family is one Python file here
plus one YAML in ``configs/model/`` (a sweep space in ``configs/sweep/`` is optional). A family kept
elsewhere names its file in its YAML (``model.module: path/to/file.py`` or a dotted module name).
Every built network is checked against the explain contract (:mod:`pipeline.models.contract`).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path
from typing import Callable

from torch import nn

FAMILIES: dict[str, Callable[..., nn.Module]] = {}
_NOT_FAMILIES = {"layers", "contract"}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: ``builder(num_classes, **args)`` builds family ``name``'s network."""
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in FAMILIES and FAMILIES[name] is not builder:
            raise ValueError(f"Model family {name!r} is registered twice.")
        FAMILIES[name] = builder
        return builder
    return add


def discover() -> dict[str, Callable[..., nn.Module]]:
    """Import every module of this package (each registers its families); the registry."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_FAMILIES:
            importlib.import_module(f"{__name__}.{info.name}")
    return FAMILIES


def load_family_module(spec: str) -> None:
    """Import a family kept outside this package: a ``.py`` file path or a dotted module name."""
    if not spec:
        return
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"model.module {spec!r}: no such file.")
        name = f"pipeline_family_{path.stem}"
        if name in sys.modules:
            return
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def build_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a registered network and check it against the explain contract."""
    from pipeline.models.contract import check_explainable

    families = discover()
    if name not in families:
        raise ValueError(f"Unknown model {name!r}: choose one of {', '.join(sorted(families))}.")
    net = families[name](num_classes=num_classes, **kwargs)
    check_explainable(net, name)
    return net


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
