"""The model zoo: one module per architecture family, registered by decorator.

Importing this package imports every family, which is what fills the registry.
"""

from backend_worker.models import bert, distilbert, mpnet, roberta  # noqa: F401  (registry)
from backend_worker.models.registry import EncoderModel, model_class, supported

__all__ = ["EncoderModel", "model_class", "supported"]
