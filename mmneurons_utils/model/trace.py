"""One place where hooks are put on the model: ``Trace`` / ``TraceDict`` ``with``-blocks.

In the spirit of baukit's ``nethook`` (``Trace``, ``TraceDict``): a block that reads or
edits the input and output of named modules while it runs and removes every hook when it
ends, also when the block raises. Every hook in the package goes through here, or through
the interventions built on it (:mod:`mmneurons_utils.interventions.ablation`).

* ``retain_input`` / ``retain_output`` keep the **last** call's first positional input /
  output (``trace.input`` / ``trace.output``), detached unless ``detach=False`` (to take
  gradients through them).
* ``edit_input(x)`` runs before the module (a forward pre-hook) on its first positional
  input; ``edit_output(output, x)`` runs after it. Either returns the replacement, or
  ``None`` to leave the value as it is — so an edit function is also how a caller *reads*
  every call (e.g. each generation step), keeping only what it needs.

``TraceDict`` does the same on several modules at once, keyed by any names (a decoder
layer's index, for instance); its edit functions get the key as their last argument.
:func:`trace_down_proj` is the one most of the package uses: ``down_proj`` of every
decoder layer, whose input is the units' coefficients ``a[l, :]``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Callable, Hashable, Iterable, Mapping

import torch

EditInput = Callable[..., "torch.Tensor | None"]
EditOutput = Callable[..., "torch.Tensor | None"]


class _HookBlock(AbstractContextManager):
    """Opens its hooks on entering; removes every one on leaving, and when opening fails."""

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Trace(_HookBlock):
    """Hooks on one ``module`` for the duration of a ``with`` block.

    ``edit_input(x) -> x' | None``; ``edit_output(output, x) -> output' | None``
    (``x`` is the module's first positional input). ``retain_input`` / ``retain_output``
    keep the last call's values as ``.input`` / ``.output``; ``detach`` (default) stores
    them without their graph. ``.calls`` counts the module's calls inside the block.
    """

    def __init__(self, module: torch.nn.Module, *, retain_input: bool = False,
                 retain_output: bool = False, detach: bool = True,
                 edit_input: EditInput | None = None, edit_output: EditOutput | None = None):
        self.module = module
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.calls = 0
        self._retain = (retain_input, retain_output)
        self._detach = detach
        self._edit_input, self._edit_output = edit_input, edit_output
        self._handles: list = []

    def _keep(self, value):
        return value.detach() if self._detach and isinstance(value, torch.Tensor) else value

    def _pre(self, module, args):
        self.calls += 1
        if not args:
            return None
        x, replaced = args[0], None
        if self._edit_input is not None:
            edited = self._edit_input(x)
            if edited is not None:
                x, replaced = edited, (edited,) + tuple(args[1:])
        if self._retain[0]:
            self.input = self._keep(x)
        return replaced

    def _post(self, module, args, output):
        if self._edit_output is not None:
            edited = self._edit_output(output, args[0] if args else None)
            if edited is not None:
                output = edited
        if self._retain[1]:
            self.output = self._keep(output)
        return output

    def _open(self) -> None:
        self._handles.append(self.module.register_forward_pre_hook(self._pre))
        if self._edit_output is not None or self._retain[1]:
            self._handles.append(self.module.register_forward_hook(self._post))

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class TraceDict(_HookBlock, dict):
    """A :class:`Trace` per named module: ``{name: Trace}`` for the duration of the block.

    ``modules``: ``{name: module}``. Raises ``ValueError`` when two names share one module
    (its hooks would fire for both). Edit functions get the name last:
    ``edit_input(x, name)``, ``edit_output(output, x, name)``.
    """

    def __init__(self, modules: Mapping[Hashable, torch.nn.Module], *, retain_input: bool = False,
                 retain_output: bool = False, detach: bool = True,
                 edit_input: EditInput | None = None, edit_output: EditOutput | None = None):
        super().__init__()
        seen: dict[int, Hashable] = {}
        for name, module in modules.items():
            if id(module) in seen:
                raise ValueError(f"{seen[id(module)]!r} and {name!r} are one module; "
                                 "its hooks could not tell them apart")
            seen[id(module)] = name
        self._modules = dict(modules)
        self._options = dict(retain_input=retain_input, retain_output=retain_output, detach=detach)
        self._edit_input, self._edit_output = edit_input, edit_output

    def _open(self) -> None:
        for name, module in self._modules.items():
            self[name] = Trace(module, **self._options, edit_input=_bind(self._edit_input, name),
                               edit_output=_bind(self._edit_output, name)).__enter__()

    def close(self) -> None:
        for trace in self.values():
            trace.close()


def _bind(function, name):
    if function is None:
        return None
    return lambda *args: function(*args, name)


def trace_down_proj(vlm, layers: Iterable[int] | None = None, **options) -> TraceDict:
    """A :class:`TraceDict` on ``down_proj`` of ``layers`` (default: every decoder layer),
    keyed by layer index. Its input is ``Float[Tensor, "B T F"]``: the units' coefficients."""
    layers = range(vlm.n_layers) if layers is None else layers
    return TraceDict({int(layer): vlm.down_proj(int(layer)) for layer in layers}, **options)
