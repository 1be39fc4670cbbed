"""Forward data-flow tracing: which call of which module or activation function made a tensor; call-site names.

Hooks exist only between :meth:`ForwardTracer.start` and :meth:`ForwardTracer.stop`; tensors are held weakly and
forgotten at :meth:`ForwardTracer.stop`. Functional calls are seen through a ``TorchFunctionMode`` that is active
only inside the model's forwards between those two calls.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_deadunits._compat import torch_functions_undispatched
from lightning_deadunits.metrics.activation_stats import CallSite

__all__ = ["ForwardTracer", "OnCall", "function_site"]

Mark = TypeVar("Mark")
OnCall = Callable[[CallSite, nn.Module, tuple[Any, ...], Any], Mark | None]
"""``on_call(site, module, inputs, output)``, run after every call of a traced module: returns the mark to give
its output tensor, or ``None`` to leave the output as it is (unmarked, or marked by an earlier call when the module
returned its input). For a functional call, ``module`` is the enclosing module."""


def function_site(enclosing: str, function: str, call: int) -> str:
    """The name of the ``call``-th call (from 0) of ``function`` in one forward of the module named ``enclosing``.

    Example:
        >>> function_site("enc.layers.0", "relu", 0)
        'enc.layers.0:relu#0'
    """
    return f"{enclosing}:{function}#{call}"


class _FunctionInterceptor(TorchFunctionMode):
    """Hands every torch function call of a forward to the tracer (the mode is off while the tracer handles it)."""

    def __init__(self, tracer: "ForwardTracer[Any]") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        output = func(*args, **(kwargs or {}))
        self.tracer._on_function(func, args, output)
        return output


class ForwardTracer(Generic[Mark]):
    """Traces forwards through a set of named modules: counts their calls and marks the tensors they output.

    **Call sites.** A call of a traced module is the site ``(name, k)``, ``k`` counting calls since its parent's
    forward began (from 0), so a module that a block calls several times (torchvision's ResNet blocks call one
    ``relu`` two or three times) has one site per call, the same in every forward. A module called from outside
    its parent's forward counts calls since :meth:`start`. :meth:`site_name` is ``"<module>"`` while the module
    has never been seen called more than once per parent forward, and ``"<module>#<k>"`` from then on; so name
    the sites of a forward once it has ended, when all its calls are counted.

    **Functional calls.** With ``functions`` given to :meth:`attach`, calls of those torch functions (matched by
    ``__name__``: ``F.relu``, ``torch.relu`` and ``Tensor.relu`` alike) made inside a forward of the model are call
    sites too, named by :func:`function_site`: ``"<enclosing module>:<function>#<k>"``, ``k`` counting that
    function's calls since the enclosing module's forward began (the root module's name is ``""``, so its calls
    are ``":relu#0"``). The enclosing module is the innermost module whose forward is running (a stack kept by
    pre- and post-forward hooks on every module); calls inside a module of a ``skip`` type (``nn.ReLU`` calls
    ``F.relu``) are left to that module. The mode is entered when the outermost forward starts and left when it
    ends, so the loss, the backward pass and the optimizer step run without it. With ``propagate`` set at
    :meth:`start`, every other function whose output has the shape of a marked tensor argument passes that mark
    on (``act(fc(x) * 0.5)`` is still fed by ``fc``).

    **Data flow.** After each call, ``on_call(site, module, inputs, output)`` runs (``output`` is the first item of
    a tuple output, as pooling with ``return_indices=True`` returns) and may return a mark for the output tensor:
    the producing layer, the site itself, whatever its user follows. A later call looks up the mark of its input
    with :meth:`mark_of`, before its own output is marked, so a module returning its input tensor (``nn.Identity``,
    in-place activations) still sees the mark of what fed it.

    Args:
        on_call: run after every call of a traced module, while started.

    Attributes:
        modules: the attached modules by name.
        calls_per_forward: the most calls of each traced module seen in one forward of its parent; kept across
            starts (what :meth:`site_name` goes by), so restore it to name sites as a former run did.
        calls: calls of each traced module since its parent's forward began (or since :meth:`start`).

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        >>> fed_by = {}
        >>> def on_call(site, module, inputs, output):
        ...     fed_by[site] = tracer.mark_of(inputs)
        ...     return site
        >>> tracer = ForwardTracer(on_call)
        >>> tracer.attach(model, dict(model.named_children()))
        >>> tracer.start()
        >>> _ = model(torch.randn(2, 4))
        >>> tracer.stop()
        >>> fed_by
        {('0', 0): None, ('1', 0): ('0', 0)}
        >>> tracer.site_name(("1", 0))
        '1'
    """

    def __init__(self, on_call: OnCall[Mark]) -> None:
        self.on_call = on_call
        self.modules: dict[str, nn.Module] = {}
        self.calls_per_forward: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._parents: dict[str, nn.Module] = {}
        self._handles: list[RemovableHandle] = []
        self._marks: dict[int, tuple[weakref.ref[Tensor], Mark]] = {}
        self.functions: Mapping[str, type[nn.Module]] = {}
        self.function_sites: dict[str, type[nn.Module]] = {}
        self._model: nn.Module | None = None
        self._skip: tuple[type, ...] = ()
        self._stack: list[tuple[str, nn.Module]] = []
        self._function_calls: dict[str, dict[str, int]] = {}
        self._interceptor: _FunctionInterceptor | None = None
        self._propagate = False
        self._busy = False
        self.forwards_traced = 0

    def attach(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        functions: Mapping[str, type[nn.Module]] | None = None,
        skip: tuple[type, ...] = (),
    ) -> None:
        """Trace ``modules`` (submodules of ``model`` by their names in it) from the next :meth:`start` on.

        Args:
            model: the model.
            modules: the modules to trace, by name.
            functions: torch functions to trace as call sites, by ``__name__``, each with the module type that
                applies it (what :attr:`function_sites` reports); ``None`` traces no function.
            skip: module types whose own functional calls are not call sites.
        """
        self.modules = dict(modules)
        self._parents = {name: model.get_submodule(name.rpartition(".")[0]) for name in self.modules}
        self._model = model
        self.functions = dict(functions or {})
        self._skip = skip

    @property
    def hooks_attached(self) -> int:
        """How many hooks this tracer currently holds on the model."""
        return len(self._handles)

    def start(self, names: Iterable[str] | None = None, propagate: bool = False, functions: bool = True) -> None:
        """Hook the attached modules (or only those named) and their parents, counting calls from 0.

        Args:
            names: the attached modules to trace; all of them when ``None``.
            propagate: pass marks on through the functions called in the forward (costly: for a first forward).
            functions: trace the attached functions (``False``: modules only, without the function mode, whose
                Python dispatch of every torch call in the forward costs several microseconds each).
        """
        self.stop()
        self._propagate = propagate
        if ((self.functions and functions) or propagate) and self._model is not None:
            for name, module in self._model.named_modules():
                self._handles.append(module.register_forward_pre_hook(self._enter(name, module)))
                self._handles.append(module.register_forward_hook(self._leave, always_call=True))
        traced = list(self.modules) if names is None else list(names)
        for name in traced:
            self._handles.append(self.modules[name].register_forward_hook(self._hook(name)))
        by_parent: dict[int, tuple[nn.Module, list[str]]] = {}
        for name in traced:
            parent = self._parents[name]
            by_parent.setdefault(id(parent), (parent, []))[1].append(name)
        for parent, children in by_parent.values():
            self._handles.append(parent.register_forward_pre_hook(self._restart_calls(children)))

    def stop(self) -> None:
        """Remove every hook and forget every tensor and call count of the forward. Safe to call at any time.

        :attr:`calls_per_forward`, which names the sites, is kept.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._marks.clear()
        self.calls.clear()
        self._stack.clear()
        self._function_calls.clear()
        self._exit_mode()
        self.forwards_traced = 0

    def site_name(self, site: CallSite) -> str:
        """``"<module>"`` for a module called once per parent forward, ``"<module>#<k>"`` otherwise."""
        name, call = site
        return name if self.calls_per_forward.get(name, 1) <= 1 else f"{name}#{call}"

    def mark_of(self, inputs: tuple[Any, ...]) -> Mark | None:
        """The mark of the first input, if it is a tensor that a traced call output and marked."""
        if not inputs or not isinstance(inputs[0], Tensor):
            return None
        found = self._marks.get(id(inputs[0]))
        # the id of a freed tensor may be reused: only a live reference to this very tensor counts
        return found[1] if found is not None and found[0]() is inputs[0] else None

    def _enter(self, name: str, module: nn.Module) -> Callable[[nn.Module, Any], None]:
        def hook(_: nn.Module, inputs: Any) -> None:
            if not self._stack and self._interceptor is None:
                self.forwards_traced += 1
                self._interceptor = _FunctionInterceptor(self)
                self._interceptor.__enter__()  # type: ignore[no-untyped-call]
            self._stack.append((name, module))
            self._function_calls[name] = {}

        return hook

    def _leave(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self._stack and self._stack[-1][1] is module:
            self._stack.pop()
        if not self._stack:
            self._exit_mode()

    def _exit_mode(self) -> None:
        if self._interceptor is not None:
            interceptor, self._interceptor = self._interceptor, None
            interceptor.__exit__(None, None, None)  # type: ignore[no-untyped-call]

    def _on_function(self, func: Callable[..., Any], args: tuple[Any, ...], output: Any) -> None:
        """One torch function call inside a forward: a call site if traced, else (maybe) a mark carrier."""
        if self._busy or not self._stack:
            return
        function = getattr(func, "__name__", "")
        kind = self.functions.get(function)
        enclosing, module = self._stack[-1]
        if kind is None or isinstance(module, self._skip):
            if self._propagate and isinstance(output, Tensor) and self.mark_of((output,)) is None:
                self._pass_mark_on(args, output)
            return
        counts = self._function_calls.setdefault(enclosing, {})
        name = function.removesuffix("_")
        call = counts.get(name, 0)
        counts[name] = call + 1
        site = function_site(enclosing, name, call)
        self.function_sites[site] = kind
        self._busy = True
        try:
            mark = self.on_call((site, 0), module, args, output)
        finally:
            self._busy = False
        if mark is not None and isinstance(output, Tensor):
            self._marks[id(output)] = (weakref.ref(output), mark)

    def _pass_mark_on(self, args: tuple[Any, ...], output: Tensor) -> None:
        for arg in args:
            if isinstance(arg, Tensor) and arg.shape == output.shape:
                mark = self.mark_of((arg,))
                if mark is not None:
                    self._marks[id(output)] = (weakref.ref(output), mark)
                    return

    def _restart_calls(self, children: list[str]) -> Callable[[nn.Module, Any], None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            for name in children:
                self.calls[name] = 0

        return hook

    def _hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            if call >= self.calls_per_forward.get(name, 0):
                self.calls_per_forward[name] = call + 1
            if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
                output = output[0]
            self._busy = True
            # The measurement's own torch calls bypass the function mode: none of them is a call site.
            outside_mode = torch_functions_undispatched() if self._interceptor else contextlib.nullcontext()
            try:
                with outside_mode:
                    mark = self.on_call((name, call), module, inputs, output)
            finally:
                self._busy = False
            if mark is not None and isinstance(output, Tensor):
                self._marks[id(output)] = (weakref.ref(output), mark)

        return hook
