"""Registration with the transformers Auto classes, and the `auto_map` that lets saved folders load with
`trust_remote_code=True` where this package is not installed."""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_unif2ace import UniF2aceConfig, UniF2aceIdentityConfig, UniF2aceMoEConfig, UniF2aceTextConfig
from .configuration_unif2ace_vq import UniF2aceVQConfig
from .hub import render_model_card
from .image_processing_unif2ace import UniF2aceImageProcessor
from .modeling_unif2ace import UniF2aceForConditionalGeneration, UniF2aceModel
from .modeling_unif2ace_vq import UniF2aceVQModel
from .processing_unif2ace import UniF2aceProcessor


GENERATION_AUTO_CLASSES = (AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM)


def register_auto_classes() -> None:
    """Register every config model_type and model class with the Auto classes (idempotent)."""
    for config_class in (UniF2aceConfig, UniF2aceTextConfig, UniF2aceMoEConfig, UniF2aceIdentityConfig, UniF2aceVQConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(UniF2aceConfig, UniF2aceModel, exist_ok=True)
    AutoModel.register(UniF2aceVQConfig, UniF2aceVQModel, exist_ok=True)
    for auto in GENERATION_AUTO_CLASSES:
        auto.register(UniF2aceConfig, UniF2aceForConditionalGeneration, exist_ok=True)
    AutoImageProcessor.register(UniF2aceConfig, image_processor_classes={"pil": UniF2aceImageProcessor}, exist_ok=True)
    AutoProcessor.register(UniF2aceConfig, UniF2aceProcessor, exist_ok=True)
    # Saving copies the flat model files next to the weights (custom_object_save); the full auto_map is written by
    # UniF2acePreTrainedModel.save_pretrained.
    UniF2aceConfig.register_for_auto_class("AutoConfig")
    UniF2aceModel.register_for_auto_class("AutoModel")
    UniF2aceForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    UniF2aceProcessor.register_for_auto_class("AutoProcessor")
    UniF2aceImageProcessor.register_for_auto_class("AutoImageProcessor")
    UniF2aceForConditionalGeneration.model_card_renderer = staticmethod(render_model_card)
