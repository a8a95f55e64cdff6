"""Changes to a loaded model's linear weights (and its token embedding), the one way a removal
reaches a model (removal/content.py applies masks and edits through it). A search undoes them
exactly after each trial (every weight back bit for bit, instead of reloading the model);
evaluation and saved models keep them (`undo=False`: no copies are kept)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_EMBEDDING = "<embedding>"  # not a linear layer's key (those are "<layer>/<module>")
_BIAS = "<bias>"  # suffixed to a key: that matrix's bias


class WeightChanges:
    """Zeroed entries and replaced matrices, remembered so that `restore` undoes them. Use as
    a context manager: the weights are restored when the block ends, whatever happened."""

    def __init__(self, loaded: Any, *, undo: bool = True) -> None:
        self.layers = {lin.key: lin for lin in loaded.linear_layers}
        self.model = loaded.model
        self.embedding = loaded.model.get_input_embeddings().weight
        self.undo = undo
        self._undo: list[tuple[str, Any, torch.Tensor]] = []
        self._lowest_changed: int | None = None  # a decoder layer's index; -1: the embedding

    def _remember(self, key: str, index: Any, saved: torch.Tensor) -> None:
        layer = -1 if key == _EMBEDDING else self.layers[key.removesuffix(_BIAS)].layer
        if self._lowest_changed is None or layer < self._lowest_changed:
            self._lowest_changed = layer
        if self.undo:
            self._undo.append((key, index, saved.clone()))

    def zero(self, key: str, mask: np.ndarray) -> int:
        """Zero the masked entries of one weight ([out, in], True = pruned); returns how many."""
        lin = self.layers[key]
        matrix = lin.weight_matrix()
        selector = torch.from_numpy(mask).to(matrix.device)
        with torch.no_grad():
            self._remember(key, selector, matrix[selector])
            lin.set_entries(selector, 0.0)
        return int(mask.sum())

    def copy_from(self, key: str, mask: np.ndarray, source: torch.Tensor) -> int:
        """Set the masked entries of one weight to `source`'s ([out, in], another model's
        weight: `--recover-from-base`); returns how many."""
        lin = self.layers[key]
        matrix = lin.weight_matrix()
        selector = torch.from_numpy(mask).to(matrix.device)
        with torch.no_grad():
            self._remember(key, None, matrix.detach())
            lin.set_entries(selector, source.to(matrix.device, matrix.dtype)[selector])
        return int(mask.sum())

    def replace(self, key: str, new_matrix: torch.Tensor) -> None:
        """Set one weight ([out, in]) to `new_matrix`, rounded to the weight's dtype."""
        lin = self.layers[key]
        with torch.no_grad():
            self._remember(key, None, lin.weight_matrix().detach())
            lin.set_matrix(new_matrix)

    def replace_bias(self, key: str, new_bias: torch.Tensor) -> None:
        """Set one matrix's bias ([out]), rounded to the bias's dtype."""
        bias = self.layers[key].bias
        assert bias is not None
        with torch.no_grad():
            self._remember(key + _BIAS, None, bias.detach())
            bias.copy_(new_bias.to(device=bias.device, dtype=bias.dtype))

    def replace_embedding(self, new_embedding: torch.Tensor) -> None:
        """Set the token embedding [vocab, d] (a tied output head changes with it)."""
        with torch.no_grad():
            self._remember(_EMBEDDING, None, self.embedding.detach())
            self.embedding.copy_(
                new_embedding.to(device=self.embedding.device, dtype=self.embedding.dtype)
            )

    def unchanged_below(self) -> int:
        """The first decoder layer with a change: the embedding and every layer below it are
        as they were (0 where the embedding changed; the layer count where nothing did)."""
        from wandacli.models.layers import decoder_layers

        if self._lowest_changed is None:
            return len(decoder_layers(self.model))
        return max(self._lowest_changed, 0)

    def restore(self) -> None:
        """Every weight as it was, in the reverse order of the changes."""
        if self.undo:
            self._lowest_changed = None
        with torch.no_grad():
            while self._undo:
                key, index, saved = self._undo.pop()
                if key == _EMBEDDING:
                    self.embedding.copy_(saved)
                    continue
                if key.endswith(_BIAS):
                    bias = self.layers[key.removesuffix(_BIAS)].bias
                    assert bias is not None
                    bias.copy_(saved)
                    continue
                lin = self.layers[key]
                if index is None:
                    lin.set_matrix(saved)
                else:
                    lin.set_entries(index, saved)

    def __enter__(self) -> WeightChanges:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def writer_norm_scale(model: Any, layer: int, treatment: dict[str, Any]) -> torch.Tensor | None:
    """The scale g of the norm that follows a writer of decoder layer `layer`, where its
    family's treatment names one (offset + the norm's weight, per channel); None where none
    does. The edit and RDO's training hooks both read it here."""
    from wandacli.models.layers import decoder_layers

    if "norm" not in treatment:
        return None
    weight = decoder_layers(model)[layer].get_submodule(treatment["norm"]).weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().to(torch.float64) + treatment["norm_offset"]
