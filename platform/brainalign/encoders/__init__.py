"""Brain encoders behind one registry. Importing this package registers every encoder.

Every module here imports only torch at import time; braindecode (seconds to import, pulls in
torchaudio) is imported inside the braindecode encoders' constructors.
"""

from . import atms, braindecode_models, mlp, nice  # noqa: F401  (register)
from ._registry import (
    REFERENCE_SHAPES,
    EncoderInfo,
    count_parameters,
    create_encoder,
    describe_encoders,
    encoder_info,
    list_encoders,
    register_encoder,
)

__all__ = [
    "REFERENCE_SHAPES",
    "EncoderInfo",
    "count_parameters",
    "create_encoder",
    "describe_encoders",
    "encoder_info",
    "list_encoders",
    "register_encoder",
]
