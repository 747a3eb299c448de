"""Image processor for UniF²ace (PIL / NumPy backend, no torchvision).

One call turns face images into up to three views, each `(batch, 3, S, S)` float32:

- `pixel_values`: the VQ tokenizer's input. Shortest side resized to `size["shortest_edge"]` (bicubic), centre-cropped
  to `crop_size`, scaled to [-1, 1] (`image_mean = image_std = 0.5`).
- `semantic_pixel_values` (`do_semantic_view`): the CLIP encoder's input, the same resize + centre crop at
  `semantic_size`, normalised with the OpenAI CLIP mean / std.
- `identity_pixel_values` (`do_identity_view`): the identity (ArcFace-style) encoder's input at `identity_size`,
  normalised as ArcFace does, `(x - 127.5) / 127.5`. There is no landmark detector here: the crop is the centred square
  of side `identity_crop_fraction * min(height, width)`, which assumes roughly centred, aligned faces (FFHQ /
  CelebA-HQ / CelebV-HQ crops, as in the paper's data). Pass `face_boxes` (one `(x0, y0, x1, y1)` pixel box or `None`
  per image, in the EXIF-rotated image) to crop detected faces instead; a box is resized to a square as is.

Every input is first brought to RGB in [0, 255] (float32, channels first), with the input's meaning decided by its
type: PIL images by mode (alpha composited on white, 16-bit modes `I;16*` and `I` scaled from [0, 65535], `F` read as
[0, 1], palettes through their palette, EXIF orientation applied); arrays / tensors by dtype (uint8 [0, 255], uint16
[0, 65535], bool {0, 1}, float [0, 1], other integers only if within [0, 255]) with 1 (gray), 2 (gray + alpha),
3 (RGB) or 4 (RGBA) channels; encoded image bytes and local file paths are decoded with PIL. Inputs that cannot be read
this way raise a `ValueError` that says what was wrong and what is accepted.

Resizing and cropping run as one PIL resampling of the source region that the crop covers, so long thin images never
materialise their full-size resized intermediate.
"""

import io
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ChannelDimension, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_available


if is_torch_available():
    import torch


VQ_MEAN = (0.5, 0.5, 0.5)
VQ_STD = (0.5, 0.5, 0.5)
# ArcFace / insightface input convention: (x - 127.5) / 127.5, i.e. mean = std = 0.5 after rescaling to [0, 1].
ARCFACE_MEAN = (0.5, 0.5, 0.5)
ARCFACE_STD = (0.5, 0.5, 0.5)

UINT8_MAX = 255.0
UINT16_MAX = 65535.0
# Float inputs may overshoot [0, 1] by half an 8-bit step (rounding) before they count as out of range.
FLOAT_RANGE_TOLERANCE = 0.5 / UINT8_MAX
NUM_CHANNELS_ACCEPTED = (1, 2, 3, 4)
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
PREMULTIPLIED_ALPHA_MODES = ("RGBa", "La")
ACCEPTED_INPUTS = (
    "PIL.Image.Image, numpy.ndarray or torch.Tensor of shape (H, W), (H, W, C), (C, H, W) or a batch (B, ...) with "
    "C in (1, 2, 3, 4), encoded image bytes, a local file path, or a (nested) list of these"
)


class UniF2aceImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    do_exif_transpose (`bool`, defaults to `True`):
        Apply the EXIF orientation tag of PIL inputs (`PIL.ImageOps.exif_transpose`).
    max_image_pixels (`int`, defaults to `2**25`):
        Largest accepted `height * width` of an input (and of a resized, uncropped output); larger inputs raise a
        `ValueError` before they are decoded (decompression-bomb guard). Files above PIL's own
        `PIL.Image.MAX_IMAGE_PIXELS` are refused by PIL first; raise that too to go past it.
    do_semantic_view (`bool`, defaults to `True`):
        Also return `semantic_pixel_values` for the CLIP encoder.
    semantic_size (`int`, defaults to 336):
        Side of the semantic view (shortest-edge resize, then centre crop).
    semantic_image_mean, semantic_image_std (`tuple[float, float, float]`, default OpenAI CLIP):
        Normalisation of the semantic view after rescaling to [0, 1].
    do_identity_view (`bool`, defaults to `True`):
        Also return `identity_pixel_values` for the identity encoder.
    identity_size (`int`, defaults to 112):
        Side of the identity view.
    identity_crop_fraction (`float`, defaults to 0.8):
        Side of the centred identity crop as a fraction of the image's shorter side, in (0, 1].
    identity_image_mean, identity_image_std (`tuple[float, float, float]`, default ArcFace 0.5 / 0.5):
        Normalisation of the identity view after rescaling to [0, 1].
    face_boxes (`list[tuple[float, float, float, float] | None]`, *optional*):
        Per call only: one `(x0, y0, x1, y1)` pixel box (or `None` for the centred crop) per image, used for the
        identity view.
    """

    do_exif_transpose: bool
    max_image_pixels: int
    do_semantic_view: bool
    semantic_size: int
    semantic_image_mean: float | list[float] | tuple[float, ...]
    semantic_image_std: float | list[float] | tuple[float, ...]
    do_identity_view: bool
    identity_size: int
    identity_crop_fraction: float
    identity_image_mean: float | list[float] | tuple[float, ...]
    identity_image_std: float | list[float] | tuple[float, ...]
    face_boxes: list | tuple | None


class UniF2aceImageProcessor(PilBackend):
    r"""
    Image processor for UniF²ace: VQ view in [-1, 1], plus optional CLIP (semantic) and face-identity views.
    See the module docstring for the input conventions and [`UniF2aceImageProcessorKwargs`] for the options.
    `UniF2aceImageProcessor.from_model_config(config)` sizes all views from a `UniF2aceConfig`.
    """

    valid_kwargs = UniF2aceImageProcessorKwargs
    model_input_names = ["pixel_values", "semantic_pixel_values", "identity_pixel_values"]

    resample = PILImageResampling.BICUBIC
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 256, "width": 256}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    image_mean = VQ_MEAN
    image_std = VQ_STD
    do_convert_rgb = True
    do_exif_transpose = True
    max_image_pixels = 2**25
    do_semantic_view = True
    semantic_size = 336
    semantic_image_mean = tuple(OPENAI_CLIP_MEAN)
    semantic_image_std = tuple(OPENAI_CLIP_STD)
    do_identity_view = True
    identity_size = 112
    identity_crop_fraction = 0.8
    identity_image_mean = ARCFACE_MEAN
    identity_image_std = ARCFACE_STD

    def __init__(self, **kwargs: Unpack[UniF2aceImageProcessorKwargs]):
        if kwargs.get("face_boxes") is not None:
            raise ValueError("face_boxes is a per-call argument of preprocess(), not a setting of the image processor")
        super().__init__(**kwargs)
        self._validate_preprocess_kwargs(**{name: getattr(self, name) for name in self._valid_kwargs_names})

    @classmethod
    def from_model_config(cls, config: Any, **kwargs: Unpack[UniF2aceImageProcessorKwargs]) -> "UniF2aceImageProcessor":
        """Size the views from a `UniF2aceConfig`: VQ resolution, CLIP `image_size`, identity `image_size`."""
        resolution = config.vq_config.resolution
        defaults = {
            "size": {"shortest_edge": resolution},
            "crop_size": {"height": resolution, "width": resolution},
            "semantic_size": config.semantic_config.image_size,
            "identity_size": config.identity_config.image_size,
        }
        return cls(**{**defaults, **kwargs})

    # ----- kwargs -----
    def _standardize_kwargs(
        self,
        semantic_image_mean=None,
        semantic_image_std=None,
        identity_image_mean=None,
        identity_image_std=None,
        **kwargs,
    ) -> dict:
        kwargs = super()._standardize_kwargs(**kwargs)
        for name, value in (
            ("semantic_image_mean", semantic_image_mean),
            ("semantic_image_std", semantic_image_std),
            ("identity_image_mean", identity_image_mean),
            ("identity_image_std", identity_image_std),
        ):
            kwargs[name] = tuple(value) if isinstance(value, list) else value
        return kwargs

    def _validate_preprocess_kwargs(self, **kwargs) -> None:
        super()._validate_preprocess_kwargs(**kwargs)
        if kwargs.get("do_convert_rgb") is False:
            raise ValueError(
                "UniF2aceImageProcessor always converts to RGB (the VQ takes 3 channels); do_convert_rgb=False is "
                "not supported"
            )
        if kwargs.get("do_pad"):
            raise ValueError("UniF2aceImageProcessor does not pad (it resizes and centre-crops); do_pad must be False")
        data_format = kwargs.get("data_format")
        if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
            raise ValueError(
                f"UniF2aceImageProcessor returns channels-first arrays; data_format={data_format!r} is not supported"
            )
        size, crop_size = kwargs.get("size"), kwargs.get("crop_size")
        if kwargs.get("do_resize") and kwargs.get("do_center_crop") and size is not None and size.shortest_edge:
            if crop_size.height > size.shortest_edge or crop_size.width > size.shortest_edge:
                raise ValueError(
                    f"crop_size ({crop_size.height}x{crop_size.width}) must fit inside the resized image, whose shorter "
                    f"side is size['shortest_edge'] = {size.shortest_edge}"
                )
        for name in ("max_image_pixels", "semantic_size", "identity_size"):
            value = kwargs.get(name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        fraction = kwargs.get("identity_crop_fraction")
        if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ValueError(f"identity_crop_fraction must be in (0, 1], got {fraction!r}")
        for prefix in ("semantic_image", "identity_image"):
            mean, std = kwargs.get(f"{prefix}_mean"), kwargs.get(f"{prefix}_std")
            if np.size(mean) not in (1, 3) or np.size(std) not in (1, 3) or np.any(np.asarray(std) <= 0):
                raise ValueError(
                    f"{prefix}_mean / {prefix}_std must be a float or 3 floats (std > 0), got {mean!r} / {std!r}"
                )

    # ----- input structure and decoding -----
    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list:
        """Flatten a single image, a batch array / tensor or a (nested) list into a list of single images."""
        flat = _flatten_images(images)
        if not flat:
            raise ValueError(f"no images were given; expected {ACCEPTED_INPUTS}")
        return flat

    def process_image(
        self,
        image: Any,
        input_data_format: str | ChannelDimension | None = None,
        do_exif_transpose: bool | None = None,
        max_image_pixels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Bring one input to RGB float32 `(3, H, W)` in [0, 255] (see the module docstring for the conventions)."""
        do_exif_transpose = self.do_exif_transpose if do_exif_transpose is None else do_exif_transpose
        max_image_pixels = self.max_image_pixels if max_image_pixels is None else max_image_pixels
        if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
            image = _decode(image, max_image_pixels)
        if isinstance(image, Image.Image):
            return _pil_to_rgb(image, do_exif_transpose, max_image_pixels)
        if is_torch_available() and isinstance(image, torch.Tensor):
            if image.is_complex():
                raise ValueError(f"complex tensors are not images (dtype {image.dtype}); expected {ACCEPTED_INPUTS}")
            tensor = image.detach().cpu()
            array = tensor.float().numpy() if tensor.dtype in (torch.bfloat16, torch.float16) else tensor.numpy()
            return _array_to_rgb(array, input_data_format, ChannelDimension.FIRST, max_image_pixels)
        if isinstance(image, np.ndarray):
            return _array_to_rgb(image, input_data_format, ChannelDimension.LAST, max_image_pixels)
        raise ValueError(f"unsupported image type {type(image).__name__}; expected {ACCEPTED_INPUTS}")

    # ----- geometry -----
    def resize_and_center_crop(
        self,
        image: np.ndarray,
        size: SizeDict | None,
        crop_size: SizeDict | None,
        resample: PILImageResampling | int,
        max_image_pixels: int,
    ) -> np.ndarray:
        """
        Resize `image` (3, H, W) as `size` says (`shortest_edge`, or `height`/`width`; None: keep), then centre-crop to
        `crop_size` (None: no crop), in one resampling pass over the source region the crop covers.
        """
        height, width = image.shape[-2:]
        if size is None:
            new_height, new_width = height, width
        elif size.shortest_edge:
            short, long = sorted((height, width))
            new_short, new_long = size.shortest_edge, int(size.shortest_edge * long / short)
            new_height, new_width = (new_short, new_long) if height <= width else (new_long, new_short)
        elif size.height and size.width:
            new_height, new_width = size.height, size.width
        else:
            raise ValueError(f"size must have 'shortest_edge' or 'height' and 'width', got {dict(size)}")
        crop_height, crop_width = (new_height, new_width) if crop_size is None else (crop_size.height, crop_size.width)
        if crop_height > new_height or crop_width > new_width:
            raise ValueError(
                f"cannot centre-crop {crop_height}x{crop_width} from a {new_height}x{new_width} image; enable do_resize "
                "or use a smaller crop_size"
            )
        if crop_height * crop_width > max_image_pixels:
            raise ValueError(
                f"the processed image would have {crop_height}x{crop_width} pixels, more than max_image_pixels="
                f"{max_image_pixels}; enable do_center_crop"
            )
        top, left = (new_height - crop_height) // 2, (new_width - crop_width) // 2
        if (new_height, new_width) == (height, width):
            return image[:, top : top + crop_height, left : left + crop_width].copy()
        scale_y, scale_x = height / new_height, width / new_width
        box = (left * scale_x, top * scale_y, (left + crop_width) * scale_x, (top + crop_height) * scale_y)
        return _resample(image, box, (crop_height, crop_width), resample)

    def crop_identity(
        self,
        image: np.ndarray,
        face_box: tuple[float, float, float, float] | None,
        identity_size: int,
        identity_crop_fraction: float,
        resample: PILImageResampling | int,
    ) -> np.ndarray:
        """Face crop `(3, identity_size, identity_size)` from `image` (3, H, W): `face_box` or the centred square."""
        height, width = image.shape[-2:]
        if face_box is None:
            side = identity_crop_fraction * min(height, width)
            box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        else:
            box = _check_face_box(face_box, height, width)
        return _resample(image, box, (identity_size, identity_size), resample)

    # ----- pipeline -----
    def _normalize_view(self, image: np.ndarray, do_rescale, rescale_factor, do_normalize, mean, std) -> np.ndarray:
        if do_rescale:
            image = self.rescale(image, rescale_factor)
        if do_normalize:
            image = self.normalize(image, mean, std)
        return image.astype(np.float32, copy=False)

    def _preprocess(
        self,
        images: list[np.ndarray],
        do_resize: bool,
        size: SizeDict,
        resample: PILImageResampling | int,
        do_center_crop: bool,
        crop_size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        return_tensors: str | TensorType | None,
        max_image_pixels: int,
        do_semantic_view: bool,
        semantic_size: int,
        semantic_image_mean: float | tuple[float, ...],
        semantic_image_std: float | tuple[float, ...],
        do_identity_view: bool,
        identity_size: int,
        identity_crop_fraction: float,
        identity_image_mean: float | tuple[float, ...],
        identity_image_std: float | tuple[float, ...],
        face_boxes: list | tuple | None = None,
        **kwargs,
    ) -> BatchFeature:
        resample = self.resample if resample is None else resample
        if face_boxes is not None:
            if not do_identity_view:
                raise ValueError("face_boxes were given but do_identity_view is False; they would be ignored")
            if not isinstance(face_boxes, (list, tuple)) or len(face_boxes) != len(images):
                raise ValueError(
                    f"face_boxes must be a list with one (x0, y0, x1, y1) box or None per image ({len(images)} images), "
                    f"got {face_boxes!r}"
                )
        data = {"pixel_values": []}
        semantic = SizeDict(shortest_edge=semantic_size)
        semantic_crop = SizeDict(height=semantic_size, width=semantic_size)
        for index, image in enumerate(images):
            view = self.resize_and_center_crop(
                image, size if do_resize else None, crop_size if do_center_crop else None, resample, max_image_pixels
            )
            data["pixel_values"].append(
                self._normalize_view(view, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            )
            if do_semantic_view:
                view = self.resize_and_center_crop(image, semantic, semantic_crop, resample, max_image_pixels)
                data.setdefault("semantic_pixel_values", []).append(
                    self._normalize_view(view, True, 1 / UINT8_MAX, True, semantic_image_mean, semantic_image_std)
                )
            if do_identity_view:
                face_box = None if face_boxes is None else face_boxes[index]
                view = self.crop_identity(image, face_box, identity_size, identity_crop_fraction, resample)
                data.setdefault("identity_pixel_values", []).append(
                    self._normalize_view(view, True, 1 / UINT8_MAX, True, identity_image_mean, identity_image_std)
                )
        shapes = {array.shape for array in data["pixel_values"]}
        if len(shapes) > 1:
            if return_tensors is not None:
                raise ValueError(
                    f"the processed images have different shapes {sorted(shapes)} and cannot be batched into tensors; "
                    "enable do_center_crop or pass return_tensors=None"
                )
        else:
            data["pixel_values"] = np.stack(data["pixel_values"])
        for name in ("semantic_pixel_values", "identity_pixel_values"):
            if name in data:
                data[name] = np.stack(data[name])
        return BatchFeature(data=data, tensor_type=return_tensors)

    def postprocess(self, pixel_values: Any) -> list[Image.Image]:
        """
        Turn VQ-view pixel values `(B, 3, H, W)` or `(3, H, W)` (numpy or torch, in [-1, 1] with the default
        normalisation) back into RGB uint8 PIL images, inverting `image_mean` / `image_std` and `rescale_factor`;
        values are clamped to [0, 255] and NaN becomes 0.
        """
        if is_torch_available() and isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().cpu().float().numpy()
        array = np.asarray(pixel_values, dtype=np.float64)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape (B, 3, H, W) or (3, H, W), got {array.shape}")
        if self.do_normalize:
            array = array * np.asarray(self.image_std).reshape(-1, 1, 1) + np.asarray(self.image_mean).reshape(-1, 1, 1)
        if self.do_rescale:
            array = array / self.rescale_factor
        array = np.clip(np.nan_to_num(np.rint(array), nan=0.0), 0, UINT8_MAX).astype(np.uint8)
        return [Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))) for image in array]


# ----- helpers (module level so they are easy to test and reuse) -----
def _is_single_image(item: Any) -> bool:
    if isinstance(item, (Image.Image, bytes, bytearray, memoryview, str, os.PathLike)):
        return True
    return isinstance(item, np.ndarray) or (is_torch_available() and isinstance(item, torch.Tensor))


def _flatten_images(images: Any) -> list:
    """A single image → [image]; a 4-D array / tensor → its B images; lists and tuples are flattened recursively."""
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if not _is_single_image(images):
        raise ValueError(f"unsupported image type {type(images).__name__}; expected {ACCEPTED_INPUTS}")
    if not isinstance(images, (np.ndarray,)) and not (is_torch_available() and isinstance(images, torch.Tensor)):
        return [images]
    if images.ndim in (2, 3):
        return [images]
    if images.ndim == 4:
        return list(images)
    raise ValueError(
        f"image arrays must have 2 (H, W), 3 (H, W, C) / (C, H, W) or 4 (B, ...) dimensions, got shape "
        f"{tuple(images.shape)}"
    )


def _check_pixel_count(height: int, width: int, max_image_pixels: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"image has zero size ({height}x{width}); height and width must be at least 1")
    if height * width > max_image_pixels:
        raise ValueError(
            f"image of {height}x{width} = {height * width} pixels exceeds max_image_pixels={max_image_pixels} "
            "(decompression-bomb guard); raise max_image_pixels to accept it"
        )


def _decode(source: bytes | bytearray | memoryview | str | os.PathLike, max_image_pixels: int) -> Image.Image:
    """Open image bytes or a local file as a (lazily decoded) PIL image, refusing oversized images from the header."""
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ValueError(f"image path {os.fspath(source)!r} is not an existing file (URLs are not fetched)")
        with open(source, "rb") as handle:
            source = handle.read()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(source)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(
            f"image exceeds PIL's decompression-bomb limit PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS} "
            f"({error}); raise it (and max_image_pixels) to accept larger images"
        ) from error
    except Exception as error:  # PIL signals unreadable data with several exception types
        raise ValueError(
            f"could not decode the image data ({type(error).__name__}: {error}); expected a complete PNG, JPEG, WebP, "
            "BMP, TIFF, GIF or other PIL-readable file"
        ) from error
    _check_pixel_count(image.height, image.width, max_image_pixels)  # from the header, before decoding pixels
    return image


def _pil_to_rgb(image: Image.Image, do_exif_transpose: bool, max_image_pixels: int) -> np.ndarray:
    """RGB float32 (3, H, W) in [0, 255] from a PIL image of any readable mode."""
    _check_pixel_count(image.height, image.width, max_image_pixels)
    try:
        image.load()
        if do_exif_transpose:
            image = ImageOps.exif_transpose(image)
    except Exception as error:  # lazily-loaded files fail here when truncated or corrupt, with varied types
        raise ValueError(
            f"could not decode the image ({type(error).__name__}: {error}); the file is truncated or corrupt"
        ) from error
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, UINT16_MAX) * (UINT8_MAX / UINT16_MAX)
        return _gray_alpha_to_rgb(gray[None], None)
    if mode == "F":
        gray = np.asarray(image)
        if not np.isfinite(gray).all():
            raise ValueError("mode 'F' image contains NaN or infinite values")
        return _gray_alpha_to_rgb(np.clip(gray.astype(np.float64), 0, 1)[None] * UINT8_MAX, None)
    if mode in PREMULTIPLIED_ALPHA_MODES:
        array = np.asarray(image, dtype=np.float64).transpose(2, 0, 1)
        alpha = array[-1:]
        # premultiplied colour c·a (valid data has c·a <= a) composited on white: c·a + 255·(1 − a)
        return _broadcast_rgb(np.minimum(array[:-1], alpha) + (UINT8_MAX - alpha))
    has_alpha = image.has_transparency_data
    try:
        converted = image.convert("RGBA" if has_alpha else "RGB")
    except Exception as error:
        raise ValueError(
            f"cannot convert PIL mode {mode!r} to RGB ({error}); supported: 1, L, LA, La, P, PA, RGB, RGBA, RGBa, "
            "RGBX, CMYK, YCbCr, I;16*, I, F and other modes PIL converts to RGB"
        ) from error
    array = np.asarray(converted, dtype=np.float64).transpose(2, 0, 1)
    return _gray_alpha_to_rgb(array[:3], array[3] / UINT8_MAX if has_alpha else None)


def _array_to_rgb(
    array: np.ndarray,
    input_data_format: str | ChannelDimension | None,
    default_channel_axis: ChannelDimension,
    max_image_pixels: int,
) -> np.ndarray:
    """RGB float32 (3, H, W) in [0, 255] from a 2-D or 3-D array, its range read off its dtype."""
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3:
        array = np.moveaxis(array, _channel_axis(array.shape, input_data_format, default_channel_axis), 0)
    else:
        raise ValueError(f"a single image array must have 2 or 3 dimensions, got shape {array.shape}")
    _check_pixel_count(array.shape[1], array.shape[2], max_image_pixels)
    values = _to_unit_255(array)
    if values.shape[0] in (2, 4):
        return _gray_alpha_to_rgb(values[:-1], values[-1] / UINT8_MAX)
    return _gray_alpha_to_rgb(values, None)


def _channel_axis(
    shape: tuple[int, ...], input_data_format: str | ChannelDimension | None, default: ChannelDimension
) -> int:
    first, last = shape[0] in NUM_CHANNELS_ACCEPTED, shape[-1] in NUM_CHANNELS_ACCEPTED
    if input_data_format is not None:
        axis = 0 if ChannelDimension(input_data_format) == ChannelDimension.FIRST else -1
        if shape[axis] not in NUM_CHANNELS_ACCEPTED:
            raise ValueError(
                f"input_data_format={input_data_format!r} puts {shape[axis]} channels on axis {axis} of shape {shape}; "
                f"images must have {NUM_CHANNELS_ACCEPTED} channels"
            )
        return axis
    if first and last:
        return 0 if default == ChannelDimension.FIRST else -1
    if first or last:
        return 0 if first else -1
    raise ValueError(
        f"cannot find the channel axis of an image of shape {shape}: the first or last dimension must be one of "
        f"{NUM_CHANNELS_ACCEPTED} (gray, gray+alpha, RGB, RGBA)"
    )


def _to_unit_255(array: np.ndarray) -> np.ndarray:
    """Values of an image array in [0, 255] (float64), read by dtype; ValueError for ranges that do not fit."""
    if array.dtype == np.bool_:
        return array.astype(np.float64) * UINT8_MAX
    if array.dtype == np.uint8:
        return array.astype(np.float64)
    if array.dtype == np.uint16:
        return array.astype(np.float64) * (UINT8_MAX / UINT16_MAX)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > UINT8_MAX:
            raise ValueError(
                f"integer image arrays of dtype {array.dtype} must hold values in [0, 255], got [{low}, {high}]; use "
                "uint8 for 8-bit and uint16 for 16-bit images"
            )
        return array.astype(np.float64)
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError("float image arrays must be finite, got NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_RANGE_TOLERANCE or high > 1 + FLOAT_RANGE_TOLERANCE:
            raise ValueError(
                f"float image arrays must hold values in [0, 1], got [{low:.4g}, {high:.4g}]; map [-1, 1] images with "
                "(x + 1) / 2 and divide 0-255 floats by 255 (or cast them to uint8)"
            )
        return np.clip(values, 0, 1) * UINT8_MAX
    raise ValueError(f"unsupported image array dtype {array.dtype}; expected bool, integer or float")


def _gray_alpha_to_rgb(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    """(1 or 3, H, W) colour in [0, 255] with optional straight alpha (H, W) in [0, 1] → RGB on white, float32."""
    if alpha is not None:
        color = color * alpha + UINT8_MAX * (1 - alpha)
    return _broadcast_rgb(color)


def _broadcast_rgb(color: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(color, (3, *color.shape[1:])), dtype=np.float32)


def _check_face_box(face_box: Any, height: int, width: int) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(value) for value in face_box)
    except (TypeError, ValueError) as error:
        raise ValueError(f"a face box must be 4 numbers (x0, y0, x1, y1) or None, got {face_box!r}") from error
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"face box {face_box!r} must satisfy 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height for an image of "
            f"{height}x{width} (after EXIF rotation)"
        )
    return x0, y0, x1, y1


def _resample(
    image: np.ndarray,
    box: tuple[float, float, float, float],
    out_size: tuple[int, int],
    resample: PILImageResampling | int,
) -> np.ndarray:
    """Resample the source `box` (x0, y0, x1, y1) of `image` (3, H, W) to `out_size` (height, width) per channel in
    PIL's float mode; clipped back to [0, 255] (bicubic overshoots)."""
    out_height, out_width = out_size
    channels = [
        np.asarray(Image.fromarray(channel).resize((out_width, out_height), resample=resample, box=box))
        for channel in image.astype(np.float32, copy=False)
    ]
    return np.clip(np.stack(channels), 0, UINT8_MAX)


__all__ = ["UniF2aceImageProcessor", "UniF2aceImageProcessorKwargs"]
