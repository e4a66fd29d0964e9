"""convert_model: swap the layers DIVISION knows for their converted versions, in place."""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .compressor import Compressor
from .config import DivisionConfig
from .layers import (
    CONTAINER_LAYOUTS,
    CONVERSIONS,
    DivisionGELU,
    DivisionLayer,
    set_conv_activations,
    set_maps_after_permute,
)
from .maxvit import MAXVIT_UNCONVERTED
from .mvit import mvit_token_grids
from .plan import LayerPlan, layer_plan
from .tokens import TokenGrid, TokenGrids, infer_token_grid

STATE_ATTR = "_division_compressor"

# Layers left alone on purpose, with the reason a summary gives.
KNOWN_UNCONVERTED: dict[type[nn.Module], str] = {
    nn.SyncBatchNorm: "SyncBatchNorm is not converted (its statistics span processes)",
    nn.AdaptiveAvgPool2d: "pooling to 1x1 is a mean, which saves nothing (other sizes keep the input)",
    nn.AvgPool1d: "keeps its input, whose shape alone backward reads (AvgPool2d and 3d are converted)",
    nn.AdaptiveAvgPool1d: "pooling to 1 is a mean, which saves nothing (other sizes keep the input)",
    nn.AdaptiveAvgPool3d: "pooling to 1x1x1 is a mean, which saves nothing (other sizes keep the input)",
    nn.Flatten: "a view: saves nothing",
    nn.Identity: "saves nothing",
    NonDynamicallyQuantizableLinear: "MultiheadAttention's output projection: the attention layer runs it",
    **MAXVIT_UNCONVERTED,
}


def conversion_for(
    module: nn.Module, cfg: DivisionConfig, token_grid: TokenGrids | None = None
) -> tuple[type[nn.Module] | None, str]:
    """(converted class, "") or (None, why this module stays as it is). Linear layers are converted
    in a model with a token grid (a transformer, whose Linear inputs are token sequences) or when
    compress_linear says so. A subclass of a converted class is converted when it defines no
    method of its own (subclass_conversion)."""
    if isinstance(module, DivisionLayer):
        return None, "already converted"
    if "timm" in sys.modules:  # a timm model's layers: timm is imported by now
        _add_timm_conversions()
    return _conversion_for_kind(type(module), module, cfg, token_grid)


@functools.cache
def _add_timm_conversions() -> None:
    """timm's fused layers (timm_blocks.py) join CONVERSIONS, once: not at `import division`,
    where importing timm would cost a second to everyone."""
    from .timm_blocks import TIMM_CONTAINER_LAYOUTS, TIMM_CONVERSIONS

    CONVERSIONS.update(TIMM_CONVERSIONS)
    CONTAINER_LAYOUTS.update(TIMM_CONTAINER_LAYOUTS)


def _conversion_for_kind(
    kind: type[nn.Module], module: nn.Module, cfg: DivisionConfig, token_grid: TokenGrids | None
) -> tuple[type[nn.Module] | None, str]:
    """conversion_for, `module` taken as a `kind` (what a lazy layer becomes at its first forward)."""
    if kind in KNOWN_UNCONVERTED:
        return None, KNOWN_UNCONVERTED[kind]
    bases = [base for base in CONVERSIONS if issubclass(kind, base)]
    if not bases:
        if next(module.children(), None) is None:
            return None, f"no DIVISION version of {kind.__name__}: its saved tensors stay as they are"
        return None, "container"
    base = max(bases, key=lambda b: len(b.__mro__))  # the nearest (LayerNorm2d, not LayerNorm)
    methods = methods_of_its_own(kind, base)
    if methods:
        owner = "nn" if base.__module__.startswith("torch.nn") else base.__module__.split(".")[0]
        return None, f"{kind.__name__} subclasses {owner}.{base.__name__} with its own {', '.join(methods)}"
    if base is nn.Linear and not cfg.compress_linear and token_grid is None:
        return None, "Linear inputs are kept exact as in the paper (compress_linear=False)"
    if base in (nn.MaxPool2d, nn.MaxPool3d) and module.return_indices:
        return None, f"{base.__name__}(return_indices=True) is not converted"
    converted = CONVERSIONS[base] if kind is base else subclass_conversion(kind, CONVERSIONS[base])
    reason = converted.reason_to_keep(module)
    return (None, reason) if reason else (converted, "")


def methods_of_its_own(kind: type[nn.Module], base: type[nn.Module]) -> list[str]:
    """The methods and properties that `kind` and the classes between it and `base` define,
    __init__ aside. A subclass without any only builds base's layer its own way (torchvision's
    Conv3DSimple: a 3x3x3 Conv3d) and runs base's forward, which the conversion replaces."""
    names = {
        name
        for cls in kind.__mro__[: kind.__mro__.index(base)]
        for name, value in vars(cls).items()
        if name != "__init__" and (inspect.isfunction(value) or isinstance(value, property))
    }
    return sorted(names)


_SUBCLASS_CONVERSIONS: dict[type[nn.Module], type[nn.Module]] = {}


def subclass_conversion(kind: type[nn.Module], converted: type[nn.Module]) -> type[nn.Module]:
    """The converted class of `kind`, a subclass of a converted layer without methods of its own:
    the converted forward on `kind` (made once per subclass; revert_model gives `kind` back)."""
    if kind not in _SUBCLASS_CONVERSIONS:
        _SUBCLASS_CONVERSIONS[kind] = type(
            f"Division{kind.__name__}", (converted, kind),
            {"__module__": converted.__module__, "__doc__": f"{kind.__name__} run by {converted.__name__}'s forward.",
             "_division_origin": (kind, converted), "__reduce_ex__": _reduce_subclass_conversion},
        )
    return _SUBCLASS_CONVERSIONS[kind]


def _reduce_subclass_conversion(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    """Pickle (torch.save of a whole model) and deepcopy by the subclass and its conversion, which
    pickle finds by name, where the class made at conversion time has no importable name."""
    return _new_subclass_conversion, type(self)._division_origin, self.__dict__.copy()


def _new_subclass_conversion(kind: type[nn.Module], converted: type[nn.Module]) -> nn.Module:
    cls = subclass_conversion(kind, converted)
    return cls.__new__(cls)


def convert_model(
    model: nn.Module, cfg: DivisionConfig | None = None, *, compressor: Compressor | None = None,
    token_grid: TokenGrids | None = None,
) -> nn.Module:
    """Patch every convertible layer of `model` in place and return the model.

    Parameters and buffers move into the new layers untouched (pretrained weights survive, the
    state_dict keys and optimizer references stay valid). If `model` itself is a single layer, a
    converted layer sharing its parameters is returned instead. `compressor` replaces the DIVISION
    codec by another one (the ActNN baseline of groupquant.py). `token_grid` says how a
    transformer's (N, T, D) tokens lie on its patch grid (tokens.py), or a sequence of grids told
    apart by their length; by default it is read from the model (torchvision's VisionTransformer,
    models.vit and MViT say it), and token inputs of unknown grid are compressed in blocks of B
    consecutive tokens. `cfg.exclude` and `cfg.layer_bits` pick modules by name (plan.py): those
    excluded stay stock, the others' records take the Q their pattern says; the patterns are
    checked before the model is touched.
    """
    cfg = DivisionConfig() if cfg is None else cfg
    if not isinstance(cfg, DivisionConfig):
        raise TypeError(f"convert_model: cfg must be a division.DivisionConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_model: expected an nn.Module, got {type(model).__name__}")
    inner = uncompiled(model)
    if inner is not model:  # torch.compile's wrapper: its module converted in place, as if compiled after
        if conversion_for(inner, cfg, token_grid)[0] is not None:
            raise ValueError("convert_model: this is a compiled lone layer, which converts into a new layer that the "
                             "compiled wrapper would not run: convert the layer first, then torch.compile it")
        convert_model(inner, cfg, compressor=compressor, token_grid=token_grid)
        return model
    if hasattr(model, STATE_ATTR) or isinstance(model, DivisionLayer):
        raise ValueError("convert_model: this model is already converted; convert a fresh copy instead")
    if isinstance(token_grid, (list, tuple)):
        token_grid = tuple(token_grid)
        if not token_grid or not all(isinstance(g, TokenGrid) for g in token_grid):
            raise TypeError("convert_model: token_grid must be a division.TokenGrid or a non-empty sequence of them")
    elif token_grid is not None and not isinstance(token_grid, TokenGrid):
        raise TypeError(f"convert_model: token_grid must be a division.TokenGrid, got {type(token_grid).__name__}")
    if token_grid is None:
        token_grid = infer_token_grid(model) or mvit_token_grids(model)
    if compressor is not None and cfg.layer_bits and type(compressor).encode is not Compressor.encode:
        raise ValueError(f"convert_model: DivisionConfig.layer_bits sets DIVISION's HFC bits; {type(compressor).__name__} "
                         "has bits of its own for every input: leave layer_bits empty")
    plan = layer_plan(model, cfg)
    _check_initialized(model, cfg, token_grid, plan)  # before anything is converted in place
    _check_plan_applies(model, cfg, token_grid, plan)
    new_cls, _ = conversion_for(model, cfg, token_grid)
    if new_cls is not None:  # a lone layer reads no tensor another layer reads: nothing to share
        single = compressor or Compressor(cfg.replace(share_inputs=False))
        single.token_grid = token_grid
        layer = new_cls.from_module(model, single)
        _convert_inside(layer, cfg, single)  # a lone container's layers (squeeze-and-excitation)
        _follow_plan(layer, "", plan, single)
        single.track_conv_maps = _has_gelu_of_unknown_layout(layer)
        # the layer is its own root: each call draws this forward's seed, as a model's forward
        # does, so torch.manual_seed reproduces it; its own hook dict, not the original's
        layer._forward_pre_hooks = layer._forward_pre_hooks.copy()
        layer.register_forward_pre_hook(single)
        return layer
    compressor = Compressor(cfg) if compressor is None else compressor
    compressor.token_grid = token_grid
    _convert_inside(model, cfg, compressor)
    _follow_plan(model, "", plan, compressor)
    compressor.track_conv_maps = _has_gelu_of_unknown_layout(model)
    setattr(model, STATE_ATTR, compressor)
    model.register_forward_pre_hook(compressor)
    return model


def _has_gelu_of_unknown_layout(model: nn.Module) -> bool:
    """Whether a converted GELU of `model` is not told how its 4-D inputs lie: then the compressor
    notes what converted convolutions and norms give (Compressor.is_conv_map), else it need not."""
    return any(isinstance(m, DivisionGELU) and m.map_layout is None for m in model.modules())


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that torch.compile(model) wraps (its `_orig_mod`), else `model`: the names that
    patterns and summaries use are its, and its hooks run where the wrapper's graph runs them."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def _convert_children(module: nn.Module, cfg: DivisionConfig, compressor: Compressor) -> None:
    for name, child in list(module.named_children()):
        new_cls, _ = conversion_for(child, cfg, compressor.token_grid)
        if new_cls is not None:
            child = new_cls.from_module(child, compressor)
            setattr(module, name, child)
        _convert_inside(child, cfg, compressor)  # a converted container's layers too


def _follow_plan(module: nn.Module, prefix: str, plan: LayerPlan, compressor: Compressor) -> None:
    """After conversion: the layers the plan excludes reverted to stock (with what is inside them),
    those it gives other bits handed the compressor at their bits."""
    if not plan:
        return
    for name, child in list(module.named_children()):
        full = f"{prefix}.{name}" if prefix else name
        if full in plan.excluded:
            setattr(module, name, revert_model(child))
            continue
        bits = plan.bits.get(full)
        if bits is not None and isinstance(child, DivisionLayer):
            child.compressor = compressor.at_bits(bits[0])
        _follow_plan(child, full, plan, compressor)


def _check_initialized(model: nn.Module, cfg: DivisionConfig, token_grid: TokenGrids | None, plan: LayerPlan) -> None:
    """An uninitialized lazy layer (LazyConv2d) becomes its stock class at its first forward,
    after convert_model has passed it by: where that class would be converted, it would train
    stock, silently. Refused, with PyTorch's own remedy for lazy modules."""
    for name, module in model.named_modules():
        if (isinstance(module, LazyModuleMixin) and module.has_uninitialized_params() and name not in plan.excluded
                and _conversion_for_kind(module.cls_to_become, module, cfg, token_grid)[0] is not None):
            raise ValueError(
                f"convert_model: {name or 'the model'!r} is an uninitialized {type(module).__name__}: it becomes "
                f"a stock {module.cls_to_become.__name__} at its first forward, which convert_model could not "
                "convert. Run one forward with a dummy batch first, then convert_model (or name it in "
                "DivisionConfig.exclude)"
            )


def _check_plan_applies(model: nn.Module, cfg: DivisionConfig, token_grid: TokenGrids | None, plan: LayerPlan) -> None:
    """A layer that computes its children itself (an attention running its projections' weights)
    takes them along: a plan that sets them apart from it is refused, since it could not take effect."""
    if not plan:
        return
    for name, module in model.named_modules():
        new_cls, _ = conversion_for(module, cfg, token_grid)
        if new_cls is None or not new_cls.COMPUTES_CHILDREN or name in plan.excluded:
            continue
        for inner in plan.inside(name):
            if inner in plan.excluded or plan.bits.get(inner) != plan.bits.get(name):
                raise ValueError(
                    f"convert_model: {inner!r} is part of {type(module).__name__} {name!r}, which DIVISION "
                    f"converts whole: DivisionConfig.exclude and layer_bits can name {name!r}, not what is inside it"
                )


def _convert_inside(module: nn.Module, cfg: DivisionConfig, compressor: Compressor) -> None:
    """The layers inside `module`, then what a converted container converts of its own
    (DivisionCNBlock.convert_inner), the map layers and conv-map activations of a Sequential, and
    the layouts a known model says (CONTAINER_LAYOUTS)."""
    _convert_children(module, cfg, compressor)
    if isinstance(module, DivisionLayer) and hasattr(module, "convert_inner"):
        module.convert_inner()
    if isinstance(module, nn.Sequential):
        set_maps_after_permute(module, compressor)
        set_conv_activations(module)
    if type(module) in CONTAINER_LAYOUTS:
        CONTAINER_LAYOUTS[type(module)](module, compressor)


def _stock_layer(layer: DivisionLayer) -> nn.Module:
    """The stock layer sharing the converted one's parameters, without a lone layer's compressor
    hook (convert_model gave it its own hook dict)."""
    # the class it was converted from: the one it names (STOCK_CLASS), else the first module class
    # of its MRO that is not a conversion
    base = type(layer).STOCK_CLASS or next(
        c for c in type(layer).__mro__ if issubclass(c, nn.Module) and not issubclass(c, DivisionLayer))
    stock = base.__new__(base)
    stock.__dict__.update({k: v for k, v in layer.__dict__.items() if k not in DivisionLayer.CONVERSION_ATTRIBUTES})
    stock._modules = layer._modules.copy()
    hooks = layer._forward_pre_hooks
    if any(hook is layer.compressor for hook in hooks.values()):
        stock._forward_pre_hooks = type(hooks)((k, h) for k, h in hooks.items() if h is not layer.compressor)
    return stock


def revert_model(model: nn.Module, recurse: bool = True) -> nn.Module:
    """Undo convert_model in place: every converted layer becomes its stock torch.nn class again
    (a converted lone layer is returned as a stock layer sharing its parameters). recurse=False
    reverts a converted lone container (a squeeze-and-excitation or ConvNeXt block) alone, its
    converted layers left as they are. A torch.compile wrapper's module is reverted in place."""
    if uncompiled(model) is not model:
        revert_model(uncompiled(model), recurse)
        return model
    if isinstance(model, DivisionLayer):
        stock = _stock_layer(model)
        return revert_model(stock) if recurse else stock
    for name, child in list(model.named_children()):
        if isinstance(child, DivisionLayer):
            child = _stock_layer(child)
            setattr(model, name, child)
        revert_model(child)  # a converted container's layers too
    compressor = model.__dict__.pop(STATE_ATTR, None)
    if compressor is not None:
        for key, hook in list(model._forward_pre_hooks.items()):
            if hook is compressor:
                del model._forward_pre_hooks[key]
    return model
