"""Serving many adapters on one base model: ``MultiAdapterModel`` (``multi_adapter_model``)."""

from fastpeft.serving.multi_adapter_model import MultiAdapterModel

__all__ = ["MultiAdapterModel"]
