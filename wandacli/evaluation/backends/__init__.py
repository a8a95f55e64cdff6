"""Generation backends, one module each, and this registry (eval-attack's `--backend`)."""

from __future__ import annotations

from wandacli.evaluation.backends import hf, vllm
from wandacli.evaluation.backends.base import Backend, Generator

BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (hf.BACKEND, vllm.BACKEND)}


def backend_named(name: str) -> Backend:
    return BACKENDS[name]


__all__ = ["BACKENDS", "Backend", "Generator", "backend_named"]
