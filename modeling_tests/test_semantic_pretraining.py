"""The semantic (CLIP) encoder's attribute pretraining (`training/semantic.py`), our offline stand-in for CLIP."""

import numpy as np
import pytest
import torch

from transformers_f2ace import UniF2aceConfig
from transformers_f2ace.data import ATTRIBUTES, NULLABLE, attribute_class_counts, attribute_labels, make_example
from transformers_f2ace.image_processing_unif2ace import UniF2aceImageProcessor
from transformers_f2ace.modeling_unif2ace_encoders import UniF2aceFeatureEncoders
from transformers_f2ace.training import probe_accuracy, train_semantic_encoder

CATEGORIES = ("background", "skin_tone")  # coarse: a 1-layer, 32 px tower learns them in a few hundred images


def faces(split: str, num: int, processor: UniF2aceImageProcessor):
    examples = [make_example(split, index, size=32) for index in range(num)]
    pixels = processor([example["image"] for example in examples], return_tensors="pt")["semantic_pixel_values"]
    labels = attribute_labels([example["attributes"] for example in examples])
    return pixels, {name: torch.from_numpy(labels[name]) for name in CATEGORIES}


def test_attribute_labels_index_values_and_mark_hidden_ones():
    attributes = [make_example("train", index)["attributes"] for index in range(40)]
    labels = attribute_labels(attributes)
    assert set(labels) == set(ATTRIBUTES)
    for name, values in ATTRIBUTES.items():
        for face, index in zip(attributes, labels[name].tolist()):
            assert index == (len(values) if face[name] is None else values.index(face[name]))
    hidden = {name for name in ATTRIBUTES for face in attributes if face[name] is None}
    assert hidden and hidden <= set(NULLABLE)
    counts = attribute_class_counts()  # the "not visible" class only where a category can be hidden
    assert counts == {name: len(values) + (name in NULLABLE) for name, values in ATTRIBUTES.items()}
    assert all(labels[name].max() < counts[name] for name in ATTRIBUTES)
    with pytest.raises(ValueError, match="'face_shape' is not in nullable"):
        attribute_labels([{**attributes[0], "face_shape": None}])


def test_pretraining_learns_attributes_and_leaves_the_tower_frozen():
    config = UniF2aceConfig.tiny()
    processor = UniF2aceImageProcessor.from_model_config(config)
    torch.manual_seed(0)
    encoder = UniF2aceFeatureEncoders(config).semantic_encoder
    initial = {name: tensor.clone() for name, tensor in encoder.state_dict().items()}
    pixels, labels = faces("train", 256, processor)
    num_classes = {name: count for name, count in attribute_class_counts().items() if name in CATEGORIES}
    heads, loss = train_semantic_encoder(encoder, pixels, labels, num_classes, steps=150, batch_size=32, lr=3e-3,
                                         progress=False)

    held_out_pixels, held_out_labels = faces("validation", 128, processor)
    accuracy = probe_accuracy(encoder, heads, held_out_pixels, held_out_labels)
    for name in CATEGORIES:  # well above always answering the held-out faces' most common value
        majority = np.bincount(held_out_labels[name].numpy()).max() / len(held_out_labels[name])
        assert accuracy[name] > majority + 0.25, (name, accuracy[name], majority)
    assert accuracy["overall"] == pytest.approx(sum(accuracy[name] for name in CATEGORIES) / len(CATEGORIES))
    assert np.isfinite(loss)
    # the tower changed, and is handed back frozen and in eval mode, as the model keeps its encoders
    assert any(not torch.equal(initial[name], tensor) for name, tensor in encoder.state_dict().items())
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert not encoder.training


def test_pretraining_rejects_mismatched_labels():
    config = UniF2aceConfig.tiny()
    encoder = UniF2aceFeatureEncoders(config).semantic_encoder
    pixels = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ValueError, match="same categories"):
        train_semantic_encoder(encoder, pixels, {"bald": torch.zeros(4, dtype=torch.long)}, {"mask": 2}, steps=1)
    with pytest.raises(ValueError, match=r"labels\['bald'\] must have shape \(4,\)"):
        train_semantic_encoder(encoder, pixels, {"bald": torch.zeros(3, dtype=torch.long)}, {"bald": 2}, steps=1)
