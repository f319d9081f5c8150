"""Triton backend. PLACEHOLDER: being written; reports itself unavailable until then."""
from __future__ import annotations

from .common import Backend

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    name = "triton"

    def not_supported_reasons(self, device, dtype):
        return ["not implemented yet"]
