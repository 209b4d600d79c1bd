"""A module container that shares all but some of its children with another."""

from __future__ import annotations

import copy

from torch import nn


def with_children(module: nn.Module, **children: nn.Module | None) -> nn.Module:
    """A shallow copy of `module` with the named children replaced (None removes one from the forward path):
    every other child, parameter and attribute is shared, and `module` keeps its own children. A plain
    `copy.copy` would share the `_modules` dict itself, so replacing a child of the copy would replace it in
    the original too."""
    other = copy.copy(module)
    other._modules = dict(module._modules)
    for name, child in children.items():
        if name not in module._modules:
            raise KeyError(f"{type(module).__name__} has no child '{name}'")
        other._modules[name] = child
    return other
