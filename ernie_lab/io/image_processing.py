"""Pictures -> what ERNIE 4.5 VL's vision encoder eats: resized, normalised, cut into 14x14 patches.

    image --resize: sides multiples of 28, area in bounds--> RGB uint8 --> (x/255 - mean) / std (CLIP)
          --> 14x14 patches of 3*14*14 = 588 numbers, grouped by 2x2 merge window --> (patches, 588)

A video is a list of frames (merged in pairs later, so an odd count gets its last frame repeated),
optionally stamped with its time in the corner as the model saw videos in training. Each picture also
gets its patch grid (T, H/14, W/14), which says how many tokens it becomes. The network that reads
the patches is in ``vision.py``; this module needs PIL and numpy, that one only torch.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ..errors import InputError
from ..model.config import VisionConfig

# ------------------------------------------------------------------------------------ constants
# The ViT's sizes are VisionConfig's defaults: 14-pixel patches, merged 2 x 2 and in pairs of frames.
PATCH, MERGE, FRAMES = VisionConfig.patch_size, VisionConfig.spatial_merge_size, VisionConfig.temporal_merge_size
GRID_FACTOR = PATCH * MERGE  # the adapter merges 2 x 2 patches, so image sides are multiples of 28
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, per RGB channel
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56                 # an image is scaled to at least 4 patches ...
IMAGE_MAX_PIXELS = 28 * 28 * 6177          # ... and at most 6177 merged tokens (~4.8 MP)
VIDEO_MIN_PIXELS = 299 * 28 * 28           # a video frame is scaled to 299 .. 1196 merged tokens
VIDEO_MAX_PIXELS = 1196 * 28 * 28
MAX_ASPECT_RATIO = 200                     # longer side / shorter side
MAX_INPUT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger inputs look like decompression bombs


# ================================================================================ images
def fit_to_grid(height: int, width: int, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                factor: int = GRID_FACTOR) -> tuple[int, int]:
    """The (height, width) an image is resized to: multiples of ``factor``, area within the bounds.

    Round each side to the nearest multiple of 28; if the area is then too large, shrink both sides by
    the same factor (rounding down), if too small grow them (rounding up). The aspect ratio is kept as
    well as 28-pixel steps allow.
    """
    if min(height, width) < 1:
        raise InputError(f"image of {width}x{height} pixels is empty; give a picture with at least one pixel.")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise InputError(f"image of {width}x{height} pixels is too elongated (aspect ratio "
                         f"{max(height, width) / min(height, width):.0f} > {MAX_ASPECT_RATIO}); crop it first.")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    if not min_pixels <= h * w <= max_pixels:
        raise InputError(f"image of {width}x{height} pixels cannot be fitted into {min_pixels} .. {max_pixels} pixels "
                         f"in {factor}-pixel steps (it would become {w}x{h}); crop it to a less elongated shape "
                         "or widen min_pixels / max_pixels.")
    return h, w


def open_image(source, name: str | None = None) -> Image.Image:
    """A PIL image from a PIL image, a file path or the bytes of an image file (fully decoded).

    The size is checked from the header, before a pixel is decoded: an image over ``MAX_INPUT_PIXELS``
    (PIL's decompression-bomb limit, ~89 M pixels) or with no pixels is refused. A file with several
    frames (GIF, APNG, TIFF pages) gives its first. ``name`` is how errors call the picture.
    """
    image, name, ours = _open_header(source, name)
    try:
        check_picture_size(image.width, image.height, name)
        _decode(image, name)
    except BaseException:
        if ours:
            image.close()
        raise
    return image


def _open_header(source, name: str | None) -> tuple[Image.Image, str, bool]:
    """(image with only its header read, its name for errors, whether this function opened it)."""
    if isinstance(source, Image.Image):
        return source, name or "the image", False
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or str(source)
        if str(source).startswith(("http://", "https://")):
            raise InputError(f"{name} is a web address; the kit downloads no pictures: download it and give the "
                             "file's path (or its bytes, or a PIL.Image).")
        if path.is_dir():
            raise InputError(f"{name} is a folder, not an image file; give the path of one picture in it.")
        if not path.is_file():
            raise InputError(f"no image file at {name}; check the path (it is read relative to {Path.cwd()}).")
        opener = lambda: Image.open(path)  # noqa: E731
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or f"<{len(data)} bytes>"
        opener = lambda: Image.open(io.BytesIO(data))  # noqa: E731
    else:
        hint = ("a tensor (3, H, W) of uint8: PIL.Image.fromarray(t.permute(1, 2, 0).numpy())"
                if isinstance(source, torch.Tensor) else "an array (H, W, 3) of uint8: PIL.Image.fromarray(array)")
        raise InputError(f"{name or 'an image'} must be a PIL.Image, a file path or bytes (of an image file), got "
                         f"{type(source).__name__}. For {hint}.")
    try:
        with warnings.catch_warnings():  # the size is checked below, with the kit's own message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return opener(), name, True
    except Image.DecompressionBombError as err:
        raise InputError(f"{name} is too large to decode safely ({err}). Downscale it first.") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not a picture: not an image file PIL can read (PNG, JPEG, WebP, ...).") from None
    except PermissionError:
        raise InputError(f"{name} cannot be read: permission denied.") from None
    except Exception as err:  # noqa: BLE001  (a damaged header raises whatever the format plugin meets)
        raise InputError(f"{name} could not be read ({type(err).__name__}: {err}); the file is probably "
                         "truncated or corrupt.") from None


def _decode(image: Image.Image, name: str) -> None:
    """Decode now: a truncated file fails here, not later in the middle of a batch."""
    try:
        image.load()
    except Exception as err:  # noqa: BLE001  (OSError, SyntaxError, struct.error, EOFError, ...)
        raise InputError(f"{name} could not be decoded ({type(err).__name__}: {err}); the file is probably "
                         "truncated or corrupt.") from None


def check_picture_size(width: int, height: int, name: str = "the image") -> None:
    """An InputError for a picture with no pixels or more than ``MAX_INPUT_PIXELS`` (a decompression bomb)."""
    if min(width, height) < 1:
        raise InputError(f"{name} of {width}x{height} pixels is empty; give a picture with at least one pixel.")
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"{name} of {width}x{height} pixels exceeds the {MAX_INPUT_PIXELS} pixels this kit accepts "
                         "(too large to decode safely); downscale it first: scale it down below that (it would be "
                         "shrunk to at most ~4.8 megapixels anyway).")


def to_rgb(image: Image.Image, name: str = "the image") -> Image.Image:
    """RGB (8 bits per channel) from any PIL mode, each read with its real range.

    * 16-bit greyscale ('I;16', 'I;16B', ...): 0 .. 65535 scaled to 0 .. 255 (x / 257, rounded);
      PIL's own conversion would clip every value above 255 to white.
    * 32-bit integers ('I'): 0 .. 255 when every value fits, else 0 .. 65535 (a 16-bit picture);
      negative values or values over 65535 are refused (the range is unknown: scale it yourself).
    * floats ('F'): 0 .. 1 when every value fits (the float-picture convention), else 0 .. 255
      (PIL's); NaN / Inf or values outside 0 .. 255 are refused.
    * transparency (RGBA, LA, PA, P or L with a transparent colour, premultiplied RGBa): composited
      onto white, so a transparent pixel becomes white.
    * CMYK, YCbCr, LAB, HSV, 1-bit, palette: PIL's conversion (CMYK as (1 - C)(1 - K), LAB via D65).
    """
    image = _high_bit_to_8_bit(image, name)
    try:
        if image.has_transparency_data:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:
        raise InputError(f"{name} has mode {image.mode!r}, which PIL cannot turn into RGB ({err}); convert it to "
                         "'RGB' or 'RGBA' yourself first.") from None


def _high_bit_to_8_bit(image: Image.Image, name: str) -> Image.Image:
    """'I;16*', 'I', 'F' -> 'L' (or 'LA' when one value is marked transparent) with the range of ``to_rgb``."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image)
    scale = _value_scale(values, image.mode, name)
    grey = Image.fromarray(np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8), "L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, (int, float)) and not isinstance(transparent, bool):
        alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8), "L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def _value_scale(values: np.ndarray, mode: str, name: str) -> float:
    """The factor that takes a high-bit picture's values to 0 .. 255."""
    if mode.startswith("I;16"):
        return 255 / 65535
    if mode == "F" and not np.isfinite(values).all():
        raise InputError(f"{name} (mode 'F', floats) holds NaN or Inf values; replace them before passing it.")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == "F":
        if low >= 0 and high <= 1:
            return 255.0
        if low >= 0 and high <= 255:
            return 1.0
        raise InputError(f"{name} (mode 'F', floats) has values {low:g} .. {high:g}; the kit reads float pictures "
                         "as 0 .. 1 (or 0 .. 255): scale it into one of these ranges first.")
    if low >= 0 and high <= 255:
        return 1.0
    if low >= 0 and high <= 65535:
        return 255 / 65535
    raise InputError(f"{name} (mode 'I', 32-bit integers) has values {low:g} .. {high:g}; the kit reads them as "
                     "0 .. 255 or 0 .. 65535 (16 bits): scale it into one of these ranges first.")


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, per channel (CLIP statistics)."""
    x = (pixels.double() * (1 / 255)).float()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: torch.Tensor, patch: int = PATCH, merge: int = MERGE) -> torch.Tensor:
    """(T, C, H, W) -> (T * H/p * W/p, C * p * p) patches, ordered frame by frame, then by 2x2 merge window.

    Within a frame the order is: merge-window row, merge-window column, row inside the window, column
    inside the window. The four patches of a window are therefore consecutive rows, and the adapter can
    merge them with a reshape.
    """
    T, C, H, W = frames.shape
    gh, gw = H // patch, W // patch
    x = frames.reshape(T, C, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (T, gh/m, gw/m, m, m, C, p, p)
    return x.reshape(T * gh * gw, C * patch * patch)


def _resize_pil(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Bicubic resize with PIL (antialiased when shrinking); returns uint8 (3, H, W)."""
    resized = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1)


def _resize_pil_via_torch(image: Image.Image, height: int, width: int) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
    return _resize_torch(pixels, height, width)[0]


def preprocess_images(images, *, min_pixels: int = IMAGE_MIN_PIXELS, max_pixels: int = IMAGE_MAX_PIXELS,
                      resize_with: str = "pil") -> dict:
    """Images (PIL images of any mode, file paths or bytes) -> what the vision encoder eats.

    Returns ``pixel_values`` float32 (patches, 588) and ``image_grid_thw`` long (images, 3) holding
    (1, H/14, W/14) per image; the image contributes H*W/(14*14*4) tokens to the text sequence.
    ``resize_with``: "pil" (PIL's bicubic, as transformers' image processor without torchvision) or
    "torch" (torch's uint8 bicubic, as its torchvision backend); the two differ by a grey level here and there.
    """
    if resize_with not in ("pil", "torch"):
        raise InputError(f"resize_with must be 'pil' or 'torch', got {resize_with!r}.")
    resize = _resize_pil if resize_with == "pil" else _resize_pil_via_torch
    check_pixel_bounds(min_pixels, max_pixels)
    images = _picture_list(images)
    patches, grids = [], []
    for i, source in enumerate(images):
        image = load_rgb(source, _picture_name(source, i, len(images)))
        h, w = fit_to_grid(image.height, image.width, min_pixels, max_pixels)
        pixels = normalize(resize(image, h, w))[None]  # (1, 3, h, w)
        patches.append(patchify(pixels))
        grids.append((1, h // PATCH, w // PATCH))
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def load_rgb(source, name: str | None = None) -> Image.Image:
    """``open_image`` then ``to_rgb``: a decoded RGB picture, size checked before decoding."""
    image = open_image(source, name)
    try:
        return to_rgb(image, name or "the image")
    finally:
        if image is not source:  # opened here from a path or bytes: let go of the file now
            image.close()


def _picture_list(images) -> list:
    """One picture or a list of them -> a non-empty list (open_image judges each picture)."""
    if not isinstance(images, (list, tuple)):
        return [images]
    if len(images) == 0:
        raise InputError("preprocess_images got no images; give at least one picture.")
    return list(images)


def _picture_name(source, index: int, count: int, kind: str = "image") -> str | None:
    """How errors call picture ``index``: its path, 'image N' in a list of several, else open_image's default."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"{kind} {index}" if count > 1 else None


def check_pixel_bounds(min_pixels, max_pixels) -> None:
    """min_pixels / max_pixels: positive whole numbers (their order is fit_to_grid's to judge)."""
    for label, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise InputError(f"{label} must be a positive whole number of pixels, got {value!r}.")


def _check_input_size(width: int, height: int) -> None:
    check_picture_size(width, height, "the video's frames")


# ------------------------------------------------------------------------------------- video
def preprocess_video(frames, *, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     fps: float | None = None, font: str | os.PathLike | None = None) -> dict:
    """Video frames -> ``pixel_values_videos`` (patches, 588) and ``video_grid_thw`` (1, 3) = (T, H/14, W/14).

    ``frames``: a list of PIL images, or a uint8 array / tensor (T, H, W, 3). An odd number of frames
    gets its last frame repeated (frames are merged in pairs). With ``font`` (a TrueType file) and
    ``fps``, each frame gets its timestamp drawn in the top-left corner, as ERNIE 4.5 VL saw videos in
    training. Frames are resized with torch's antialiased bicubic filter, like the reference video
    processor (which differs slightly from PIL's filter used for still images).
    """
    check_pixel_bounds(min_pixels, max_pixels)
    video = _frames_to_tensor(frames)  # (T, 3, H, W) uint8
    if font is not None:
        video = draw_timestamps(video, fps if fps is not None else 24.0, font)
    if video.shape[0] % FRAMES:
        video = torch.cat([video, video[-1:]])  # repeat the last frame
    T, _, H, W = video.shape
    _check_input_size(W, H)
    h, w = fit_to_grid(H, W, min_pixels, max_pixels)
    video = _resize_torch(video, h, w)
    pixels = normalize(video)
    return {"pixel_values_videos": patchify(pixels),
            "video_grid_thw": torch.tensor([[T, h // PATCH, w // PATCH]], dtype=torch.long)}


def _frames_to_tensor(frames) -> torch.Tensor:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError("preprocess_video got no frames.")
        images = [load_rgb(f, _picture_name(f, i, 2, "frame")) for i, f in enumerate(frames)]
        if len({im.size for im in images}) > 1:
            raise InputError(f"all frames of a video must have one size, got {sorted({im.size for im in images})}.")
        return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    video = frames if isinstance(frames, torch.Tensor) else _array_or_none(frames)
    if video is None:
        raise InputError(f"video frames must be a list of pictures or a uint8 array (frames, height, width, 3), "
                         f"got {type(frames).__name__}.")
    if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise InputError(f"video frames must be uint8 of shape (frames, height, width, 3), got {video.dtype} "
                         f"{tuple(video.shape)}.")
    if video.shape[0] == 0:
        raise InputError("preprocess_video got no frames.")
    return video.permute(0, 3, 1, 2).contiguous()


def _array_or_none(frames) -> torch.Tensor | None:
    """A numeric array as a tensor; None for what is not one (a path, None, a dict, ...)."""
    if isinstance(frames, (str, bytes, os.PathLike, dict, type(None))):
        return None
    array = np.asarray(frames)
    return torch.as_tensor(array) if array.dtype.kind in "biuf" else None


def _resize_torch(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, height, width): torch's antialiased bicubic on uint8 (CPU kernel)."""
    if video.shape[-2:] == (height, width):
        return video
    if video.device.type == "cpu":
        return F.interpolate(video, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    x = F.interpolate(video.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 255).round().to(torch.uint8)  # no uint8 kernel off the CPU: float, then round


def timestamp_text(seconds: float) -> str:
    """'time: 00:01:02.50' for 62.5 s, the label drawn on each video frame."""
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    return f"time: {int(hours):02d}:{int(minutes):02d}:{rest:05.02f}"


def draw_timestamps(video: torch.Tensor, fps: float, font: str | os.PathLike) -> torch.Tensor:
    """Write each frame's time (frame index / fps) in black with a white outline, top-left."""
    out = video.clone()
    for i, frame in enumerate(video):
        image = Image.fromarray(frame.permute(1, 2, 0).numpy())
        size = int(min(image.size) * 0.1)
        try:
            face = ImageFont.truetype(str(font), size)
        except OSError as err:
            raise InputError(f"cannot load the font {font} ({err}); pass a TrueType (.ttf) file.") from None
        ImageDraw.Draw(image).text((0, 0), timestamp_text(i / fps), font=face, fill=(0, 0, 0),
                                   stroke_width=int(size * 0.1), stroke_fill=(255, 255, 255))
        out[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return out
