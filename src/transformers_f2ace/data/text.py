"""Captions and VQA pairs for SynthFace attribute dicts.

Captions name every visible attribute that is not absent ("no" / "none" values are left out, so a caption without
"glasses" means no glasses); the order of the phrases and the sentence template vary with the rng. VQA answers are
single attribute values or "yes" / "no" (exact-match gradable; `ANSWER_VOCABULARY` lists them all).
"""

from typing import Optional

import numpy as np

from .attributes import ATTRIBUTES, Attributes


def subject_noun(attributes: Attributes) -> str:
    """"man" when facial hair shows, "woman" when lipstick shows, otherwise "person"."""
    if attributes["beard"] not in (None, "none") or "yes" in (attributes["moustache"], attributes["stubble"]):
        return "man"
    if attributes["lipstick"] not in (None, "none"):
        return "woman"
    return "person"


def expression(attributes: Attributes) -> Optional[str]:
    """"laughing" (smiling, open mouth), "smiling", "surprised" (open mouth) or "neutral"; None under a mask."""
    smiling, open_ = attributes["smiling"], attributes["mouth_open"]
    if smiling is None or open_ is None:
        return None
    if smiling == "yes":
        return "laughing" if open_ == "yes" else "smiling"
    return "surprised" if open_ == "yes" else "neutral"


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _hair_phrase(a: Attributes) -> Optional[str]:
    if a["bald"] == "yes":
        return None
    words = [a["hair_length"], a["hair_colour"], a["hair_style"]]
    phrase = " ".join(w for w in words if w is not None) + " hair"
    return phrase + " with bangs" if a["bangs"] == "yes" else phrase


def _facial_hair_phrase(a: Attributes) -> Optional[str]:
    """Beard / moustache / stubble; the facial hair colour is named only when bald (else the hair phrase has it)."""
    colour = f"{a['hair_colour']} " if a["bald"] == "yes" and a["hair_colour"] is not None else ""
    parts = []
    if a["beard"] == "goatee":
        parts.append(f"a {colour}goatee")
    elif a["beard"] == "full":
        parts.append(f"a full {colour}beard")
    if a["moustache"] == "yes":
        parts.append(f"a {colour}moustache" if not parts else "a moustache")
    if a["stubble"] == "yes":
        parts.append("stubble")
    return " and ".join(parts) if parts else None


def _eye_phrase(a: Attributes) -> Optional[str]:
    if a["eyes_closed"] == "yes":
        return "closed eyes"
    return f"{a['eye_colour']} eyes" if a["eye_colour"] is not None else None


def _feature_phrases(a: Attributes) -> list[str]:
    """What the face has ("with ..."): hair, face, skin, eyes, brows, facial hair, make-up."""
    brows = ("raised " if a["eyebrows_raised"] == "yes" else "") + f"{a['eyebrows']} eyebrows"
    phrases = [
        _hair_phrase(a),
        "a heart-shaped face" if a["face_shape"] == "heart" else _article(f"{a['face_shape']} face"),
        f"{a['skin_tone']} skin",
        _eye_phrase(a),
        brows,
        _facial_hair_phrase(a),
        f"{a['lipstick']} lipstick" if a["lipstick"] not in (None, "none") else None,
        "blushing cheeks" if a["blush"] == "yes" else None,
    ]
    return [p for p in phrases if p is not None]


def _accessory_phrases(a: Attributes) -> list[str]:
    """What the person wears ("wearing ...")."""
    phrases = [
        "sunglasses" if a["sunglasses"] == "yes" else None,
        f"{a['glasses']} glasses" if a["glasses"] not in (None, "none") else None,
        _article(f"{a['hat_colour']} {a['hat']}") if a["hat"] not in (None, "none") else None,
        f"{a['earrings']} earrings" if a["earrings"] not in (None, "none") else None,
        "a face mask" if a["mask"] == "yes" else None,
    ]
    return [p for p in phrases if p is not None]


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(attributes: Attributes, rng: np.random.Generator, num_phrases: Optional[int] = None) -> str:
    """One English caption of a face.

    Args:
        attributes: a (consistent) attribute dict.
        rng: picks the template and the phrase order.
        num_phrases: keep only this many randomly chosen attribute phrases (for short prompts); `None` keeps all.
            The subject noun and expression always stay.
    """
    a = attributes
    noun = subject_noun(a)
    mood = expression(a)
    if a["bald"] == "yes":
        noun = f"bald {noun}"
    if mood not in (None, "neutral"):
        noun = f"{mood} {noun}"
    features, accessories = _feature_phrases(a), _accessory_phrases(a)
    background = f"{a['background']} background"
    if num_phrases is not None:
        if num_phrases < 0:
            raise ValueError(f"num_phrases must be >= 0 or None, got {num_phrases}")
        tagged = [("f", p) for p in features] + [("a", p) for p in accessories] + [("b", background)]
        keep = set(rng.permutation(len(tagged))[:num_phrases].tolist())
        features = [p for i, (k, p) in enumerate(tagged) if k == "f" and i in keep]
        accessories = [p for i, (k, p) in enumerate(tagged) if k == "a" and i in keep]
        background = background if len(tagged) - 1 in keep else None
    features = [features[i] for i in rng.permutation(len(features))]
    accessories = [accessories[i] for i in rng.permutation(len(accessories))]

    template = int(rng.integers(4))
    subject = _article(noun)
    if template == 0:
        text = subject.capitalize()
        text += f" with {_join(features)}" if features else ""
        text += f", wearing {_join(accessories)}" if accessories else ""
        text += f", on {_article(background)}." if background else "."
    elif template == 1:
        text = f"A portrait of {subject}"
        text += f" with {_join(features)}" if features else ""
        text += f". The person wears {_join(accessories)}" if accessories else ""
        text += f". The background is {background.split()[0]}." if background else "."
    elif template == 2:
        text = f"This {noun} has {_join(features)}." if features else f"This is {subject}."
        text += f" They are wearing {_join(accessories)}." if accessories else ""
        text += f" Background: {background.split()[0]}." if background else ""
    else:
        text = f"Close-up of {subject}"
        parts = features + ([f"wearing {_join(accessories)}"] if accessories else [])
        text += f": {', '.join(parts)}" if parts else ""
        text += f"; {background}." if background else "."
    return text


# (category, question templates); "{v}" in a template asks a yes/no question about value v.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "face_shape": ("What shape is the face?", "What is the face shape?"),
    "skin_tone": ("What is the skin tone?", "What colour is the skin?"),
    "hair_colour": ("What colour is the hair?", "What is the hair colour?"),
    "bald": ("Is the person bald?",),
    "hair_length": ("How long is the hair?", "What is the hair length?"),
    "hair_style": ("What texture is the hair?", "Is the hair straight, wavy or curly?"),
    "bangs": ("Does the person have bangs?", "Is there a fringe?"),
    "eye_colour": ("What colour are the eyes?", "What is the eye colour?"),
    "eyes_closed": ("Are the eyes closed?",),
    "eyebrows": ("Are the eyebrows thick or thin?",),
    "eyebrows_raised": ("Are the eyebrows raised?",),
    "beard": ("What kind of beard does the person have?",),
    "moustache": ("Does the person have a moustache?",),
    "stubble": ("Does the person have stubble?",),
    "glasses": ("What kind of glasses is the person wearing?",),
    "sunglasses": ("Is the person wearing sunglasses?",),
    "hat": ("What kind of hat is the person wearing?",),
    "hat_colour": ("What colour is the hat?",),
    "earrings": ("What kind of earrings is the person wearing?",),
    "mask": ("Is the person wearing a face mask?", "Is the mouth covered by a mask?"),
    "lipstick": ("What colour is the lipstick?",),
    "blush": ("Does the person have blushing cheeks?",),
    "smiling": ("Is the person smiling?",),
    "mouth_open": ("Is the mouth open?",),
    "background": ("What colour is the background?",),
}
# Categorical questions can also be asked as yes/no about one value.
VALUE_CHECKS: dict[str, str] = {
    "face_shape": "Is the face {v}?",
    "skin_tone": "Is the skin {v}?",
    "hair_colour": "Is the hair {v}?",
    "hair_length": "Is the hair {v}?",
    "hair_style": "Is the hair {v}?",
    "eye_colour": "Are the eyes {v}?",
    "hat_colour": "Is the hat {v}?",
    "background": "Is the background {v}?",
}
EXPRESSION_QUESTION = "What is the facial expression?"
EXPRESSIONS = ("neutral", "smiling", "laughing", "surprised")
ANSWER_VOCABULARY: tuple[str, ...] = tuple(
    sorted({v for values in ATTRIBUTES.values() for v in values} | {"yes", "no"} | set(EXPRESSIONS))
)


def vqa_pairs(attributes: Attributes, rng: np.random.Generator, value_check_prob: float = 0.3) -> list[tuple[str, str]]:
    """One (question, answer) pair per visible category, plus the expression when the mouth shows.

    Categorical questions are asked, with probability `value_check_prob`, as a yes/no check of the true value or
    of a random other value (half each). Answers are in `ANSWER_VOCABULARY`.
    """
    if not 0.0 <= value_check_prob <= 1.0:
        raise ValueError(f"value_check_prob must be in [0, 1], got {value_check_prob}")
    pairs = []
    for name, templates in QUESTIONS.items():
        value = attributes[name]
        if value is None:
            continue
        if name in VALUE_CHECKS and rng.random() < value_check_prob:
            others = [v for v in ATTRIBUTES[name] if v != value]
            asked = value if rng.random() < 0.5 else str(rng.choice(others))
            pairs.append((VALUE_CHECKS[name].format(v=asked), "yes" if asked == value else "no"))
        else:
            pairs.append((templates[int(rng.integers(len(templates)))], value))
    mood = expression(attributes)
    if mood is not None:
        pairs.append((EXPRESSION_QUESTION, mood))
    return pairs
