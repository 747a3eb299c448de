"""Deterministic flat-colour face renderer for SynthFace.

Everything is drawn in a normalised frame of `GRID` x `GRID` units (8 x 8 pixels each at 64 px, i.e. 2 x 2 image
tokens of the embedded model), so features are large and sit on the grid:

    rows 0-1   hat (ends at y = 1.7), crown of the hair     row 3    eyes / glasses / sunglasses, eyes centred
    rows 1-2   fringe (bangs), ends at y = 2.3                       in columns 2 and 5
    row  2     eyebrows (raised: higher, arched, tilted)    row 4    blush, nose, earrings; a mask from y = 4.55
    cols 0-1, 6-7 of rows 1-7: hair length (short /         rows 5-6 moustache, mouth, goatee, beard, stubble
               medium / long) and earrings

A unit is `size / GRID` pixels, so the same face renders at any size (64, 128, 256, ...). No randomness: the image
is a function of the attribute dict alone.
"""

from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from .attributes import MASK_COLOUR, PALETTE, RGB, Attributes, validate_attributes


GRID = 8
EYE_CENTRES = (2.5, 5.5)
EYE_Y = (3.08, 3.92)
BROW_BOTTOM = {"no": 2.98, "yes": 2.42}
BROW_THICKNESS = {"thin": 0.14, "thick": 0.5}
HAIRLINE_Y = 1.45
BANGS_BOTTOM = 2.3
SHORT_HAIR_BOTTOM = 3.1
MASK_TOP = 4.55
OUTLINE_WIDTH = 0.12
HAT_BOTTOM = 1.7

BROW_COLOUR: RGB = (30, 24, 22)
FRAME_COLOUR: RGB = (22, 22, 26)
SUNGLASS_COLOUR: RGB = (26, 26, 36)
EYE_WHITE: RGB = (250, 250, 250)
PUPIL_COLOUR: RGB = (16, 16, 18)
MOUTH_INSIDE: RGB = (86, 20, 32)
TEETH_COLOUR: RGB = (252, 252, 252)
BLUSH_COLOUR: RGB = (238, 96, 128)
NATURAL_LIP: RGB = (200, 90, 100)  # mixed into a darker skin tone

# A shape is a list of primitives in grid units: ("ellipse", box), ("rect", box), ("rrect", box, radius),
# ("polygon", points), ("chord", box, start_deg, end_deg) with PIL's angle convention (0 = 3 o'clock, clockwise).
Shape = list[tuple]

FACE_SHAPES: dict[str, tuple[Shape, float]] = {  # shape, x of the face's left edge at eye height
    "oval": ([("ellipse", (1.6, 0.9, 6.4, 7.5))], 1.6),
    "round": ([("ellipse", (1.2, 1.25, 6.8, 7.05))], 1.2),
    "square": ([("rrect", (1.5, 1.0, 6.5, 7.1), 0.6)], 1.5),
    "heart": (
        [("ellipse", (1.4, 0.9, 6.6, 5.6)), ("polygon", [(1.45, 3.6), (6.55, 3.6), (4.4, 7.0), (3.6, 7.0)]),
         ("ellipse", (3.55, 6.6, 4.45, 7.5))],
        1.4,
    ),
    "long": ([("ellipse", (1.85, 0.4, 6.15, 7.9))], 1.85),
}
BACK_HAIR: dict[str, Shape] = {  # "short" hugs the head: see `_back_hair`
    "medium": [("rrect", (0.5, 0.6, 7.5, 5.6), 1.4)],
    "long": [("rrect", (0.2, 0.6, 7.8, 9.0), 1.4)],
}


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    """(1 - t) * a + t * b."""
    return tuple(int(round((1 - t) * x + t * y)) for x, y in zip(a, b))


def _shade(colour: RGB, amount: float = 0.3) -> RGB:
    """A darker tone of a light colour, a lighter tone of a dark one (so the shade always shows)."""
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    return _mix(colour, (0, 0, 0) if luminance > 80 else (255, 255, 255), amount)


def _mirror(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    return (GRID - x1, y0, GRID - x0, y1)


class _Canvas:
    """An RGB image plus drawing helpers that take grid units."""

    def __init__(self, size: int, background: RGB):
        self.size = size
        self.unit = size / GRID
        self.image = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.image)

    def px(self, u: float) -> int:
        return int(round(u * self.unit))

    def box(self, box) -> list[int]:
        """Grid box [x0, x1) x [y0, y1) -> PIL's inclusive pixel box."""
        x0, y0, x1, y1 = box
        return [self.px(x0), self.px(y0), max(self.px(x0), self.px(x1) - 1), max(self.px(y0), self.px(y1) - 1)]

    def points(self, points) -> list[tuple[float, float]]:
        return [(x * self.unit, y * self.unit) for x, y in points]

    def width(self, w: float) -> int:
        return max(1, self.px(w))

    def shape(self, draw: ImageDraw.ImageDraw, shape: Shape, fill) -> None:
        for kind, *args in shape:
            if kind == "ellipse":
                draw.ellipse(self.box(args[0]), fill=fill)
            elif kind == "rect":
                draw.rectangle(self.box(args[0]), fill=fill)
            elif kind == "rrect":
                draw.rounded_rectangle(self.box(args[0]), radius=self.px(args[1]), fill=fill)
            elif kind == "polygon":
                draw.polygon(self.points(args[0]), fill=fill)
            elif kind == "chord":
                draw.chord(self.box(args[0]), args[1], args[2], fill=fill)
            else:
                raise ValueError(f"unknown shape primitive {kind!r}")

    def mask(self, shape: Shape, clip: Optional[Image.Image] = None) -> Image.Image:
        """L-mode mask (255 inside) of a shape, intersected with `clip` if given."""
        mask = Image.new("L", (self.size, self.size), 0)
        self.shape(ImageDraw.Draw(mask), shape, 255)
        return mask if clip is None else ImageChops.multiply(mask, clip)

    def fill(self, shape: Shape, colour: RGB, clip: Optional[Image.Image] = None) -> None:
        if clip is None:
            self.shape(self.draw, shape, colour)
        else:
            self.image.paste(colour, (0, 0, self.size, self.size), self.mask(shape, clip))

    def paste(self, source: Image.Image, mask: Image.Image) -> None:
        self.image.paste(source, (0, 0), mask)


@lru_cache(maxsize=256)
def _hair_texture(style: str, colour: RGB, size: int) -> Image.Image:
    """A full-canvas hair fill: straight = vertical streaks, wavy = wave bands, curly = rows of curls."""
    canvas = _Canvas(size, colour)
    shade = _shade(colour, 0.38)
    if style == "straight":
        for x in np.arange(0.2, GRID, 0.6):
            canvas.fill([("rect", (x, 0, x + 0.24, GRID))], shade)
    elif style == "wavy":
        xs = np.linspace(0, GRID, 8 * GRID + 1)
        for y in np.arange(0.1, GRID + 0.7, 0.7):
            points = canvas.points([(x, y + 0.2 * np.sin(2 * np.pi * x / 1.2)) for x in xs])
            canvas.draw.line(points, fill=shade, width=canvas.width(0.26))
    elif style == "curly":
        for row, y in enumerate(np.arange(0.15, GRID + 0.7, 0.62)):
            for x in np.arange(0.15 + 0.31 * (row % 2), GRID + 0.7, 0.62):
                canvas.draw.ellipse(canvas.box((x - 0.26, y - 0.26, x + 0.26, y + 0.26)), outline=shade,
                                    width=canvas.width(0.14))
    else:
        raise ValueError(f"unknown hair_style {style!r}")
    return canvas.image


@lru_cache(maxsize=64)
def _stubble_texture(skin: RGB, size: int) -> Image.Image:
    """A darker skin tone stippled with darker dots (a five-o'clock shadow)."""
    canvas = _Canvas(size, _shade(skin, 0.3))
    dot = _shade(skin, 0.6)
    for row, y in enumerate(np.arange(0.1, GRID, 0.36)):
        for x in np.arange(0.1 + 0.18 * (row % 2), GRID, 0.36):
            canvas.fill([("rect", (x, y, x + 0.14, y + 0.14))], dot)
    return canvas.image


def _outline(canvas: _Canvas, region: Image.Image, colour: RGB) -> None:
    """Paint the inner border (OUTLINE_WIDTH wide) of a mask."""
    kernel = 2 * canvas.width(OUTLINE_WIDTH) + 1
    canvas.image.paste(colour, (0, 0, canvas.size, canvas.size),
                       ImageChops.subtract(region, region.filter(ImageFilter.MinFilter(kernel))))


def _draw_mouth(canvas: _Canvas, a: Attributes, skin: RGB) -> None:
    """Mouth in rows 5-6: neutral lips, a closed smile (crescent), an open O, or a laugh (open D with teeth)."""
    natural = a["lipstick"] in (None, "none")
    lip = _mix(_shade(skin, 0.45), NATURAL_LIP, 0.25) if natural else PALETTE["lipstick"][a["lipstick"]]
    smiling, open_ = a["smiling"] == "yes", a["mouth_open"] == "yes"
    if smiling and open_:
        canvas.fill([("chord", (2.75, 4.45, 5.25, 6.6), 0, 180), ("rrect", (2.85, 5.3, 5.15, 5.7), 0.15)], lip)
        canvas.fill([("chord", (3.05, 4.85, 4.95, 6.3), 0, 180)], MOUTH_INSIDE)
        canvas.fill([("rect", (3.15, 5.575, 4.85, 5.825))], TEETH_COLOUR)
    elif smiling:
        crescent = ImageChops.subtract(canvas.mask([("chord", (2.8, 4.5, 5.2, 6.5), 0, 180)]),
                                       canvas.mask([("chord", (3.05, 4.2, 4.95, 6.05), 0, 180)]))
        canvas.image.paste(lip, (0, 0, canvas.size, canvas.size), crescent)
    elif open_:
        canvas.fill([("ellipse", (3.25, 5.1, 4.75, 6.8))], lip)
        canvas.fill([("ellipse", (3.45, 5.3, 4.55, 6.6))], MOUTH_INSIDE)
    else:
        canvas.fill([("ellipse", (3.05, 5.4, 4.95, 6.05))], lip)
        canvas.draw.line(canvas.points([(3.15, 5.72), (4.85, 5.72)]), fill=_shade(lip, 0.45), width=canvas.width(0.1))


def _draw_eyes(canvas: _Canvas, a: Attributes) -> None:
    """Eyes fill the centre of cells (3, 2) and (3, 5): white, a large flat iris and a small pupil; or a closed lid."""
    y0, y1 = EYE_Y
    for c in EYE_CENTRES:
        if a["eyes_closed"] == "yes":
            canvas.draw.arc(canvas.box((c - 0.46, y0, c + 0.46, y1 - 0.1)), 0, 180, fill=BROW_COLOUR,
                            width=canvas.width(0.16))
        else:
            canvas.fill([("ellipse", (c - 0.48, y0, c + 0.48, y1))], EYE_WHITE)
            canvas.fill([("ellipse", (c - 0.38, y0 + 0.04, c + 0.38, y1 - 0.04))],
                        PALETTE["eye_colour"][a["eye_colour"]])
            canvas.fill([("ellipse", (c - 0.1, 3.4, c + 0.1, 3.6))], PUPIL_COLOUR)


def _draw_brows(canvas: _Canvas, a: Attributes) -> None:
    """Flat, gently arched brows; raised ones sit higher, arch more and tilt up towards the nose."""
    raised = a["eyebrows_raised"] == "yes"
    bottom, thickness = BROW_BOTTOM[a["eyebrows_raised"]], BROW_THICKNESS[a["eyebrows"]]
    arch, tilt = (0.25, 0.2) if raised else (0.1, 0.0)
    for c, inner in zip(EYE_CENTRES, (1, -1)):
        outer_x, inner_x = c - 0.55 * inner, c + 0.55 * inner
        polygon = [(outer_x, bottom), (outer_x, bottom - thickness), (c, bottom - thickness - arch),
                   (inner_x, bottom - thickness - tilt), (inner_x, bottom - tilt), (c, bottom - arch)]
        canvas.fill([("polygon", polygon)], BROW_COLOUR)


def _draw_eyewear(canvas: _Canvas, a: Attributes, face_left: float) -> None:
    if a["sunglasses"] == "yes":
        for c in EYE_CENTRES:
            canvas.fill([("rrect", (c - 0.64, 2.95, c + 0.64, 4.1), 0.28)], SUNGLASS_COLOUR)
        lens_half, top, width = 0.64, 3.3, 0.16
    elif a["glasses"] == "round":
        for c in EYE_CENTRES:
            canvas.draw.ellipse(canvas.box((c - 0.64, 2.86, c + 0.64, 4.14)), outline=FRAME_COLOUR,
                                width=canvas.width(0.14))
        lens_half, top, width = 0.64, 3.3, 0.14
    elif a["glasses"] == "square":
        for c in EYE_CENTRES:
            canvas.draw.rectangle(canvas.box((c - 0.66, 2.92, c + 0.66, 4.08)), outline=FRAME_COLOUR,
                                  width=canvas.width(0.24))
        lens_half, top, width = 0.66, 3.1, 0.24
    else:
        return
    left, right = EYE_CENTRES
    for x0, x1 in ((left + lens_half, right - lens_half), (face_left, left - lens_half),
                   (right + lens_half, GRID - face_left)):
        canvas.fill([("rect", (x0, top, x1, top + width))], FRAME_COLOUR)


def _draw_hat(canvas: _Canvas, hat: str, colour: RGB, face_left: float) -> None:
    """Hats fill rows 0-1 and end at y = HAT_BOTTOM, above the fringe."""
    shade = _shade(colour, 0.3)
    face_right = GRID - face_left
    if hat == "cap":
        canvas.fill([("chord", (face_left - 0.25, 0.0, face_right + 0.25, 2 * HAT_BOTTOM), 180, 360)], colour)
        canvas.fill([("polygon", [(3.8, 1.3), (7.9, 1.35), (7.8, HAT_BOTTOM), (3.8, HAT_BOTTOM)])], shade)
        canvas.fill([("ellipse", (3.7, 0.0, 4.3, 0.4))], shade)
    elif hat == "beanie":
        dome = [("chord", (face_left - 0.3, 0.1, face_right + 0.3, 2 * HAT_BOTTOM), 180, 360)]
        canvas.fill(dome, colour)
        ribs = [("rect", (x, 0.4, x + 0.22, 1.3)) for x in np.arange(face_left + 0.15, face_right, 0.6)]
        canvas.fill(ribs, shade, clip=canvas.mask(dome))
        canvas.fill([("rect", (face_left - 0.3, 1.2, face_right + 0.3, HAT_BOTTOM))], shade)
        canvas.fill([("ellipse", (3.45, -0.35, 4.55, 0.75))], shade)
    elif hat == "top hat":
        canvas.fill([("rect", (2.2, 0.0, 5.8, 1.4))], colour)
        canvas.fill([("rect", (2.2, 0.95, 5.8, 1.3))], shade)
        canvas.fill([("rrect", (0.9, 1.25, 7.1, HAT_BOTTOM), 0.2)], colour)
    elif hat == "cowboy hat":
        canvas.fill([("ellipse", (0.0, 0.95, 8.0, HAT_BOTTOM + 0.05))], colour)
        canvas.fill([("polygon", [(2.3, 1.4), (2.5, 0.05), (3.6, 0.35), (4.0, 0.15), (4.4, 0.35), (5.5, 0.05),
                                  (5.7, 1.4)])], colour)
        canvas.fill([("rect", (2.35, 0.9, 5.65, 1.3))], shade)


def _draw_lower_face(canvas: _Canvas, a: Attributes, skin: RGB, hair: Optional[RGB], face: Image.Image,
                     face_left: float) -> None:
    """Cheeks, nose, stubble, beard, moustache, then the mask or the mouth (rows 4-7, clipped to the face)."""
    face_right = GRID - face_left
    if a["blush"] == "yes":
        cheeks = [("ellipse", (1.85, 3.95, 3.05, 4.55)), ("ellipse", (4.95, 3.95, 6.15, 4.55))]
        canvas.fill(cheeks, BLUSH_COLOUR, clip=face)
    canvas.fill([("ellipse", (3.72, 4.1, 4.28, 4.55))], _shade(skin, 0.2))
    if a["stubble"] == "yes":
        canvas.paste(_stubble_texture(skin, canvas.size), canvas.mask([("rect", (0, 5.05, GRID, GRID))], face))
    if a["beard"] == "goatee":
        canvas.fill([("ellipse", (2.9, 5.6, 5.1, 7.6))], hair, clip=face)
    elif a["beard"] == "full":
        canvas.fill([("rect", (0, 5.0, GRID, GRID)), ("rect", (0, MASK_TOP, face_left + 0.6, 5.2)),
                     ("rect", (face_right - 0.6, MASK_TOP, GRID, 5.2))], hair, clip=face)
    if a["moustache"] == "yes":
        canvas.fill([("polygon", [(2.8, 5.45), (3.2, 4.85), (4.8, 4.85), (5.2, 5.45), (4.6, 5.25), (3.4, 5.25)])],
                    hair)
    if a["mask"] == "yes":
        canvas.fill([("rect", (0, MASK_TOP, GRID, GRID))], MASK_COLOUR, clip=face)
        pleats = [("rect", (face_left + 0.4, y, face_right - 0.4, y + 0.14)) for y in (5.4, 6.2)]
        canvas.fill(pleats, _shade(MASK_COLOUR, 0.25), clip=face)
    else:
        _draw_mouth(canvas, a, skin)


def _draw_front_hair(canvas: _Canvas, a: Attributes, texture: Image.Image, face_left: float) -> None:
    """Hair over the face: the crown above the hairline, sideburns down to the eyes, and the fringe if any."""
    face_right = GRID - face_left
    crown = canvas.mask([("ellipse", (face_left - 0.3, 0.3, face_right + 0.3, 3.4))])
    ImageDraw.Draw(crown).rectangle(canvas.box((0, HAIRLINE_Y, GRID, GRID)), fill=0)
    sides = [("rect", (face_left - 0.3, 1.0, face_left + 0.32, 3.0)),
             ("rect", (face_right - 0.32, 1.0, face_right + 0.3, 3.0))]
    if a["bangs"] == "yes":
        sides.append(("polygon", [(face_left + 0.05, 1.0), (face_right - 0.05, 1.0),
                                  (face_right - 0.3, BANGS_BOTTOM), (face_left + 0.3, BANGS_BOTTOM)]))
    canvas.paste(texture, ImageChops.lighter(crown, canvas.mask(sides)))


def render_face(attributes: Attributes, size: int = 64) -> Image.Image:
    """Draw a face from an attribute dict (see `attributes.ATTRIBUTES`; `None` = not shown).

    Args:
        attributes: one value (or `None`) for every category; `sample_attributes` makes consistent ones.
        size: image side in pixels (>= 16); multiples of `GRID` keep features on the token grid.

    Returns:
        RGB PIL image of shape (size, size); identical attributes always give identical pixels.
    """
    if not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an int >= 16, got {size!r}")
    validate_attributes(attributes)
    a, size = attributes, int(size)
    canvas = _Canvas(size, PALETTE["background"][a["background"]])
    skin = PALETTE["skin_tone"][a["skin_tone"]]
    hair = PALETTE["hair_colour"][a["hair_colour"]] if a["hair_colour"] is not None else None
    face_shape, face_left = FACE_SHAPES[a["face_shape"]]
    face_right = GRID - face_left
    # hair_style is None only where too little hair shows to tell (hat over short hair): draw it plain
    texture = _hair_texture(a["hair_style"] or "straight", hair, size) if a["bald"] != "yes" else None

    if texture is not None:
        short = [("rrect", (face_left - 0.3, 0.3, face_right + 0.3, SHORT_HAIR_BOTTOM), 1.0)]
        canvas.paste(texture, canvas.mask(BACK_HAIR.get(a["hair_length"], short)))
    canvas.fill([("rect", (3.0, 6.0, 5.0, GRID))], _shade(skin, 0.15))
    ear = (face_left - 0.4, 3.2, face_left + 0.3, 4.55)
    canvas.fill([("ellipse", ear), ("ellipse", _mirror(ear))], _shade(skin, 0.1))
    face = canvas.mask(face_shape)
    canvas.fill(face_shape, skin)
    _draw_lower_face(canvas, a, skin, hair, face, face_left)
    _outline(canvas, face, _shade(skin, 0.45))
    if texture is not None:
        _draw_front_hair(canvas, a, texture, face_left)
    if a["sunglasses"] != "yes":
        _draw_eyes(canvas, a)
    _draw_brows(canvas, a)
    _draw_eyewear(canvas, a, face_left)
    if a["earrings"] not in (None, "none"):
        for x in (face_left - 0.05, face_right + 0.05):
            canvas.draw.ellipse(canvas.box((x - 0.42, 4.5, x + 0.42, 5.34)), fill=PALETTE["earrings"][a["earrings"]],
                                outline=FRAME_COLOUR, width=canvas.width(0.08))
    if a["hat"] not in (None, "none"):
        _draw_hat(canvas, a["hat"], PALETTE["hat_colour"][a["hat_colour"]], face_left)
    return canvas.image
