"""Changes to a loaded model's linear weights (and its token embedding) that are undone exactly: a search applies one
removal per trial to the same model and puts every weight back bit for bit before the next,
instead of reloading it."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

_EMBEDDING = "<embedding>"  # not a linear layer's key (those are "<layer>/<module>")


class WeightChanges:
    """Zeroed entries and replaced matrices, remembered so that `restore` undoes them. Use as
    a context manager: the weights are restored when the block ends, whatever happened."""

    def __init__(self, loaded: Any) -> None:
        self.layers = {lin.key: lin for lin in loaded.linear_layers}
        self.embedding = loaded.model.get_input_embeddings().weight
        self._undo: list[tuple[str, Any, torch.Tensor]] = []

    def zero(self, key: str, mask: np.ndarray) -> int:
        """Zero the masked entries of one weight ([out, in], True = pruned), as
        `masks.apply_mask` does; returns how many."""
        matrix = self.layers[key].weight_matrix()
        rows, cols = np.nonzero(mask)
        index = (
            torch.from_numpy(rows).to(matrix.device),
            torch.from_numpy(cols).to(matrix.device),
        )
        with torch.no_grad():
            self._undo.append((key, index, matrix[index].clone()))
            matrix[index] = 0
        return int(rows.size)

    def replace(self, key: str, new_matrix: torch.Tensor) -> None:
        """Set one weight ([out, in]) to `new_matrix`, rounded to the weight's dtype."""
        matrix = self.layers[key].weight_matrix()
        with torch.no_grad():
            self._undo.append((key, None, matrix.detach().clone()))
            matrix.copy_(new_matrix.to(device=matrix.device, dtype=matrix.dtype))

    def replace_embedding(self, new_embedding: torch.Tensor) -> None:
        """Set the token embedding [vocab, d] (a tied output head changes with it)."""
        with torch.no_grad():
            self._undo.append((_EMBEDDING, None, self.embedding.detach().clone()))
            self.embedding.copy_(
                new_embedding.to(device=self.embedding.device, dtype=self.embedding.dtype)
            )

    def restore(self) -> None:
        """Every weight as it was, in the reverse order of the changes."""
        with torch.no_grad():
            while self._undo:
                key, index, saved = self._undo.pop()
                if key == _EMBEDDING:
                    self.embedding.copy_(saved)
                    continue
                matrix = self.layers[key].weight_matrix()
                if index is None:
                    matrix.copy_(saved)
                else:
                    matrix[index] = saved

    def __enter__(self) -> WeightChanges:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
