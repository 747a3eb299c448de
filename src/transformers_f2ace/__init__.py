"""transformers-f2ace: UniF²ace as a native Hugging Face transformers model.

Importing the package registers every UniF²ace class with the transformers Auto classes.
"""

from .configuration_unif2ace import UniF2aceConfig, UniF2aceIdentityConfig, UniF2aceMoEConfig, UniF2aceTextConfig
from .configuration_unif2ace_vq import UniF2aceVQConfig
from .image_processing_unif2ace import UniF2aceImageProcessor
from .modeling_unif2ace import UniF2aceForConditionalGeneration, UniF2aceModel, UniF2acePreTrainedModel
from .modeling_unif2ace_vq import UniF2aceVQModel
from .processing_unif2ace import UniF2aceProcessor
from .registration import register_auto_classes


register_auto_classes()

__version__ = "0.1.0"
__all__ = [
    "UniF2aceConfig",
    "UniF2aceTextConfig",
    "UniF2aceMoEConfig",
    "UniF2aceIdentityConfig",
    "UniF2aceVQConfig",
    "UniF2acePreTrainedModel",
    "UniF2aceModel",
    "UniF2aceForConditionalGeneration",
    "UniF2aceVQModel",
    "UniF2aceImageProcessor",
    "UniF2aceProcessor",
    "register_auto_classes",
]
