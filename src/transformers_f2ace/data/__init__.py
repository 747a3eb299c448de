"""SynthFace: a procedural, seeded, fine-grained face dataset (PIL drawing, no downloads).

`ATTRIBUTES` is the category -> values table; `sample_attributes` draws consistent attribute dicts (occluded
categories are `None`); `render_face` draws them on an 8 x 8 unit grid; `caption` / `vqa_pairs` give text;
`load_synthface` builds a `datasets.Dataset` (needs the `train` extra); `save_gallery` writes a PNG grid.
"""

from .attributes import (
    ABSENT_VALUE,
    ATTRIBUTES,
    NULLABLE,
    PALETTE,
    apply_occlusion,
    attribute_class_counts,
    attribute_labels,
    sample_attributes,
    split_of,
    validate_attributes,
    visible_attributes,
)
from .render import GRID, render_face
from .synthface import (SPLIT_SEED_OFFSET, SPLITS, conversation, example_attributes, example_seed, load_synthface,
                        make_example, save_gallery)
from .text import ANSWER_VOCABULARY, caption, expression, subject_noun, vqa_pairs


__all__ = [
    "ABSENT_VALUE",
    "ANSWER_VOCABULARY",
    "ATTRIBUTES",
    "GRID",
    "NULLABLE",
    "PALETTE",
    "SPLITS",
    "SPLIT_SEED_OFFSET",
    "apply_occlusion",
    "attribute_class_counts",
    "attribute_labels",
    "caption",
    "conversation",
    "example_attributes",
    "example_seed",
    "expression",
    "load_synthface",
    "make_example",
    "render_face",
    "sample_attributes",
    "save_gallery",
    "split_of",
    "subject_noun",
    "validate_attributes",
    "visible_attributes",
    "vqa_pairs",
]
