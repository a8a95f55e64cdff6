"""The decoder's linear layers, found by architecture, as uniform (out, in) matrices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from wandacli.core.errors import ModelError
from wandacli.core.fingerprint import ModelFingerprint
from wandacli.models.families import family_of_model
from wandacli.models.families.base import GENERIC_LAYER_PATHS, Family


@dataclass(frozen=True)
class LinearLayer:
    """One weight matrix of a decoder layer, named as in the reference code.

    `name` is relative to the decoder layer, e.g. `self_attn.q_proj` or `mlp.down_proj`. Most
    are a module's 2-D `weight` (an `nn.Linear`, GPT-2's Conv1D, a router). Some are part of a
    parameter, named as their own module would be, with `module_name` the module that holds
    them:

        an expert's matrix   one slice (`expert`) of a 3-D expert parameter (transformers 5),
                             e.g. `mlp.experts.3.down_proj` in `mlp.experts`
        a fused matrix's part  the rows of one of the matrices a fused weight holds (Phi-3's
                             qkv_proj holds q_proj, k_proj, v_proj; gate_up_proj gate_proj and
                             up_proj): `rows` (start, stop, step), or `row_index` where the
                             rows are interleaved head by head (GPT-NeoX's query_key_value)

    `weight_matrix()` always returns the [out_features, in_features] matrix that scores and
    masks are shaped like (GPT-2's Conv1D stores [in, out]), a view whose writes reach the
    model except for a `row_index` part (a copy): change a matrix through `set_matrix` and
    `set_entries`, which write through in every case.
    """

    layer: int
    name: str
    module: nn.Module
    parameter: str = "weight"
    module_name: str | None = None  # the module holding it, where that is not `name`
    expert: int | None = None
    rows: tuple[int, int, int] | None = None  # (start, stop, step) of its rows
    row_index: tuple[int, ...] | None = None  # its rows, where no slice selects them
    reads: str | None = None  # an expert's matrix: what it reads (families/base.py READS_*)

    @property
    def transposed(self) -> bool:
        if self.expert is not None:
            return bool(getattr(self.module, "is_transposed", False))
        return _is_conv1d(self.module)

    @property
    def weight(self) -> torch.Tensor:
        """The parameter holding the matrix, in the module's own layout (for an expert or a
        part, the whole parameter it shares)."""
        weight = getattr(self.module, self.parameter)
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def is_expert(self) -> bool:
        return self.expert is not None

    @property
    def parameter_key(self) -> str:
        """The key of the parameter behind the matrix: the matrix's own key, except for
        experts and parts, which share `<layer>/<module>.<parameter>`."""
        if self.module_name is None:
            return self.key
        return f"{self.layer}/{self.module_name}.{self.parameter}"

    def _whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """The [out, in] view of the whole matrix the rows are selected from."""
        if self.expert is not None:
            tensor = tensor[self.expert]
        return tensor.t() if self.transposed else tensor

    def _index(self, device: torch.device) -> torch.Tensor:
        assert self.row_index is not None
        return torch.tensor(self.row_index, dtype=torch.long, device=device)

    def matrix_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This matrix [out, in] within a tensor shaped like `weight` (the weight itself, or a
        gradient accumulator of it): a view, or a copy for a `row_index` part."""
        whole = self._whole(tensor)
        if self.rows is not None:
            start, stop, step = self.rows
            return whole[start:stop:step]
        if self.row_index is not None:
            return whole[self._index(whole.device)]
        return whole

    def weight_matrix(self) -> torch.Tensor:
        """The weight as an [out_features, in_features] matrix (see the class docstring)."""
        return self.matrix_of(self.weight)

    def place(self, tensor: torch.Tensor, matrix: torch.Tensor) -> None:
        """Write `matrix` [out, in] into its place in `tensor` (shaped like `weight`)."""
        whole = self._whole(tensor)
        matrix = matrix.to(device=whole.device, dtype=whole.dtype)
        if self.row_index is not None:
            whole[self._index(whole.device)] = matrix
        else:
            self.matrix_of(tensor).copy_(matrix)

    def set_matrix(self, matrix: torch.Tensor) -> None:
        """Set the whole matrix in the model, rounded to the weight's dtype."""
        with torch.no_grad():
            self.place(self.weight, matrix)

    def set_entries(self, selector: torch.Tensor, values: torch.Tensor | float) -> None:
        """Set the entries `selector` ([out, in] bool) picks to `values` (one per entry, or
        one for all) in the model."""
        with torch.no_grad():
            matrix = self.weight_matrix()
            if isinstance(values, torch.Tensor):
                values = values.to(device=matrix.device, dtype=matrix.dtype)
            matrix[selector.to(matrix.device)] = values
            if self.row_index is not None:  # the matrix was a copy: put it back
                self.place(self.weight, matrix)

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias added to this matrix's output ([out]), where it has one (a copy for a
        `row_index` part; the writers a direction edit changes the bias of are never parts)."""
        if self.expert is not None:
            bias = getattr(self.module, f"{self.parameter}_bias", None)
            if not isinstance(bias, torch.Tensor):
                return None
            bias = bias[self.expert]
        else:
            bias = getattr(self.module, "bias", None)
            if not isinstance(bias, torch.Tensor):
                return None
        if self.rows is not None:
            start, stop, step = self.rows
            return bias[start:stop:step]
        if self.row_index is not None:
            return bias[self._index(bias.device)]
        return bias

    @property
    def shape(self) -> tuple[int, int]:
        whole = self._whole(self.weight)  # a view: no part is copied to learn its shape
        out_features, in_features = whole.shape
        if self.rows is not None:
            out_features = len(range(*self.rows)[: int(out_features)])
        elif self.row_index is not None:
            out_features = len(self.row_index)
        return int(out_features), int(in_features)

    @property
    def key(self) -> str:
        """The store path of this layer's arrays: `<layer>/<module>`."""
        return f"{self.layer}/{self.name}"


def fingerprint_of(layers: list[LinearLayer], model: nn.Module) -> ModelFingerprint:
    num_layers = 1 + max((lin.layer for lin in layers), default=-1)
    return ModelFingerprint(
        shapes={lin.key: lin.shape for lin in layers},
        num_layers=num_layers,
        family=family_of_model(model).name,
    )


# ---------------------------------------------------------------------------------------------
# Decoder layers and their linear layers


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder layers: where its family keeps them, else where common
    architectures do, else the ModuleList as long as the config's layer count."""
    for path in (family_of_model(model).layers_path, *GENERIC_LAYER_PATHS):
        with contextlib.suppress(AttributeError):
            candidate = model.get_submodule(path)
            if isinstance(candidate, nn.ModuleList) and len(candidate) > 0:
                return candidate
    config = getattr(model, "config", None)
    expected = None
    for attribute in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attribute, None)
        if isinstance(value, int):
            expected = value
            break
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and expected is not None and len(module) == expected:
            return module
    raise ModelError(
        f"cannot find the decoder layers of {type(model).__name__} (tried "
        f"{', '.join(GENERIC_LAYER_PATHS)}): add its family in wandacli/models/families/, or "
        "please report this architecture"
    )


def decoder_layers_path(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise ModelError(f"cannot name the decoder layers of {type(model).__name__}")


def iter_linear_layers(model: nn.Module) -> Iterator[LinearLayer]:
    """Every weight matrix inside the decoder layers, in module order (the reference's
    `find_layers` order for linear layers): each linear layer, each other module's 2-D
    `weight` (a router), and each expert's matrices of a 3-D expert parameter, expert by
    expert, split as the model's family declares (models/families/)."""
    family = family_of_model(model)
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if not name or isinstance(module, nn.Embedding):
                continue
            if _is_linear(module):
                yield from _linear_matrices(index, name, module, family, model)
                continue
            weight = module._parameters.get("weight")
            if weight is not None and weight.dim() == 2:
                yield LinearLayer(layer=index, name=name, module=module)
            yield from _expert_matrices(index, name, module, family)


def _linear_matrices(
    index: int, name: str, module: nn.Module, family: Family, model: nn.Module
) -> Iterator[LinearLayer]:
    """A linear layer's matrix, or its parts where the family declares it fused."""
    fused = family.fused.get(name)
    whole = LinearLayer(layer=index, name=name, module=module)
    parts = fused.part_rows(whole.shape[0], model.config) if fused is not None else []
    if not parts:
        yield whole
        return
    for part, rows, row_index in parts:
        yield LinearLayer(
            layer=index,
            name=part,
            module=module,
            module_name=name,
            rows=rows,
            row_index=row_index,
        )


def _expert_matrices(
    index: int, name: str, module: nn.Module, family: Family
) -> Iterator[LinearLayer]:
    """One matrix per expert and part of each 3-D parameter the family declares."""
    declared = [
        (family.expert_parameter(p), p)
        for p, value in module._parameters.items()
        if value is not None and value.dim() == 3
    ]
    declared_parameters = [(d, p) for d, p in declared if d is not None]
    if not declared_parameters:
        return
    experts = int(module._parameters[declared_parameters[0][1]].shape[0])  # type: ignore[union-attr]
    transposed = bool(getattr(module, "is_transposed", False))
    interleaved = not bool(getattr(module, "is_concatenated", True))
    for expert in range(experts):
        for declaration, parameter in declared_parameters:
            assert declaration is not None
            shape = module._parameters[parameter].shape  # type: ignore[union-attr]
            out_features = int(shape[2] if transposed else shape[1])
            parts = len(declaration.parts)
            for position, part in enumerate(declaration.parts):
                if parts == 1:
                    rows = None
                elif interleaved:
                    rows = (position, out_features, parts)
                else:
                    size = out_features // parts
                    rows = (position * size, (position + 1) * size, 1)
                yield LinearLayer(
                    layer=index,
                    name=f"{name}.{expert}.{part}",
                    module=module,
                    parameter=parameter,
                    module_name=name,
                    expert=expert,
                    rows=rows,
                    reads=declaration.reads,
                )


def unmatched_matrices(model: nn.Module) -> list[str]:
    """Parameters of two or more dimensions inside the decoder layers that are no matrix
    wandacli scores, masks or edits (a 3-D parameter its family does not declare): named, so
    that the loader says so instead of leaving them out silently."""
    covered = {(id(lin.module), lin.parameter) for lin in iter_linear_layers(model)}
    missing = []
    for index, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Embedding):
                continue
            for parameter, value in module._parameters.items():
                if value is None or value.dim() < 2 or (id(module), parameter) in covered:
                    continue
                where = f"{name}.{parameter}" if name else parameter
                missing.append(f"layer {index} {where} {list(value.shape)}")
    return missing
