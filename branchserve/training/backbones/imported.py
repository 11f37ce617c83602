"""A backbone a user names by import path, `package.module:factory`.

The factory is called with whichever of `num_classes`, `in_channels` and `image_size` it takes as
parameters and must return a `torch.nn.Module` mapping (N, C, H, W) images to (N, classes)
logits. The current directory is importable, as with `python -m`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable

from torch import nn


class BackboneError(ValueError):
    """A backbone that cannot be built, cut or initialised as asked; the message says what to change."""


def factory(path: str) -> Callable[..., object]:
    module_name, _, attribute = path.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackboneError(f"--backbone {path}: cannot import {module_name}: {e}") from None
    found = getattr(module, attribute, None)
    if not callable(found):
        raise BackboneError(f"--backbone {path}: {module_name} has no function or class named {attribute}")
    return found


def build_imported(path: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    make = factory(path)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    try:
        accepted = inspect.signature(make).parameters
    except (TypeError, ValueError):
        accepted = {}
    given = {k: v for k, v in offered.items() if k in accepted}
    try:
        module = make(**given)
    except Exception as e:  # the user's code, whatever it raises
        raise BackboneError(f"--backbone {path}: calling it with {given or 'no arguments'} failed: {e}") from None
    if not isinstance(module, nn.Module):
        raise BackboneError(f"--backbone {path} returned a {type(module).__name__}, not a torch.nn.Module")
    return module
