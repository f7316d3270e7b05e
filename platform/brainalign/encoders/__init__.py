"""Brain encoders behind one registry. Importing this package registers every encoder."""

from . import nice  # noqa: F401  (registers)
from ._registry import EncoderInfo, create_encoder, encoder_info, list_encoders, register_encoder

__all__ = ["EncoderInfo", "create_encoder", "encoder_info", "list_encoders", "register_encoder"]
