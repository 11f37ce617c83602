"""Backbones besides the built-in branched ResNet: named ones (a ResNet-18 in torchvision's layout,
a mobile-style inverted-residual net) and any `torch.nn.Module` a user names by import path, cut
into stages at named modules with an exit after each cut (`staged.py`), optionally starting from a
trained state dict (`init.py`).

`spec.py` needs no torch, so the command line checks `--backbone` and `--branch-after` before
torch loads; `build.py` makes the model.
"""
