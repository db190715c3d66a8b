"""The eyes of ERNIE 4.5 VL: pictures -> patches -> ViT features -> tokens in the text width.

    image --resize to multiples of 28--> normalise --> 14x14 patches (flattened 3*14*14 = 588 numbers)
    patches --Linear--> ViT blocks:  x = x + Attn(LN(x)),  x = x + MLP(LN(x))       (one frame at a time)
    adapter:  4 neighbouring patches (2x2) -> one vector,  2 frames -> one vector,  -> text width

Three ERNIE-specific twists: (1) positions inside the ViT are 2-D rotary angles (row, column) applied
rotate-half style (first half / second half of each head), unlike the text decoder's interleaved
pairs; (2) patches are stored already grouped by 2x2 merge window, so the adapter's spatial merge is a
plain reshape; (3) a still image is one frame duplicated in time, so images and videos share one
temporal merge. The module names follow the Hub's ``vision_model.*`` / ``resampler_model.*`` tensors;
``VISION_NAME_MAP`` below is the whole translation.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import nn

from .config import VisionConfig  # noqa: F401  (re-exported: it was defined here)
from .errors import ConfigError, InputError
from .hub_names import VISION_NAME_MAP, hub_to_lab
from .norm import RMSNorm

# ------------------------------------------------------------------------------------ constants
PATCH_SIZE = 14                  # a patch is 14 x 14 pixels
MERGE_SIZE = 2                   # the adapter merges 2 x 2 patches ...
GRID_FACTOR = PATCH_SIZE * MERGE_SIZE  # ... so image sides must be multiples of 28
TEMPORAL_MERGE = 2               # ... and 2 frames
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation, per RGB channel
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MIN_PIXELS = 56 * 56                 # an image is scaled to at least 4 patches ...
IMAGE_MAX_PIXELS = 28 * 28 * 6177          # ... and at most 6177 merged tokens (~4.8 MP)
VIDEO_MIN_PIXELS = 299 * 28 * 28           # a video frame is scaled to 299 .. 1196 merged tokens
VIDEO_MAX_PIXELS = 1196 * 28 * 28
MAX_ASPECT_RATIO = 200                     # longer side / shorter side
MAX_INPUT_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # larger inputs look like decompression bombs


# ================================================================================ preprocessing
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


def open_image(source) -> Image.Image:
    """A PIL image from a PIL image, a file path or the bytes of an image file (fully decoded)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (str, os.PathLike)):
        name, opener = str(source), lambda: Image.open(Path(source))
        if not Path(source).is_file():
            raise InputError(f"no image file at {name}.")
    elif isinstance(source, (bytes, bytearray)):
        name, opener = f"<{len(source)} bytes>", lambda: Image.open(io.BytesIO(bytes(source)))
    else:
        raise InputError(f"an image must be a PIL.Image, a file path or bytes, got {type(source).__name__}. "
                         "For arrays use PIL.Image.fromarray(array).")
    try:
        image = opener()
        image.load()  # decode now: a truncated file fails here, not later in the middle of a batch
    except Image.DecompressionBombError as err:
        raise InputError(f"{name} is too large to decode safely ({err}). Downscale it first.") from None
    except UnidentifiedImageError:
        raise InputError(f"{name} is not an image file PIL can read (PNG, JPEG, WebP, ...).") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InputError(f"{name} could not be decoded ({err}); the file is probably truncated or corrupt.") from None
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency composited onto white (RGBA, LA, PA, P with a transparent colour)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, per channel (CLIP statistics)."""
    x = (pixels.double() * (1 / 255)).float()
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def patchify(frames: torch.Tensor, patch: int = PATCH_SIZE, merge: int = MERGE_SIZE) -> torch.Tensor:
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
    if isinstance(images, (Image.Image, str, os.PathLike, bytes, bytearray)):
        images = [images]
    if len(images) == 0:
        raise InputError("preprocess_images got no images.")
    patches, grids = [], []
    for source in images:
        image = to_rgb(open_image(source))
        _check_input_size(image.width, image.height)
        h, w = fit_to_grid(image.height, image.width, min_pixels, max_pixels)
        pixels = normalize(resize(image, h, w))[None]  # (1, 3, h, w)
        patches.append(patchify(pixels))
        grids.append((1, h // PATCH_SIZE, w // PATCH_SIZE))
    return {"pixel_values": torch.cat(patches), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def _check_input_size(width: int, height: int) -> None:
    if width * height > MAX_INPUT_PIXELS:
        raise InputError(f"image of {width}x{height} pixels exceeds the {MAX_INPUT_PIXELS} pixels this kit accepts; "
                         "downscale it first (it would be shrunk to at most ~4.8 megapixels anyway).")


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
    video = _frames_to_tensor(frames)  # (T, 3, H, W) uint8
    if font is not None:
        video = draw_timestamps(video, fps if fps is not None else 24.0, font)
    if video.shape[0] % TEMPORAL_MERGE:
        video = torch.cat([video, video[-1:]])  # repeat the last frame
    T, _, H, W = video.shape
    _check_input_size(W, H)
    h, w = fit_to_grid(H, W, min_pixels, max_pixels)
    video = _resize_torch(video, h, w)
    pixels = normalize(video)
    return {"pixel_values_videos": patchify(pixels),
            "video_grid_thw": torch.tensor([[T, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=torch.long)}


def _frames_to_tensor(frames) -> torch.Tensor:
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise InputError("preprocess_video got no frames.")
        images = [to_rgb(open_image(f)) for f in frames]
        if len({im.size for im in images}) > 1:
            raise InputError(f"all frames of a video must have one size, got {sorted({im.size for im in images})}.")
        return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])
    video = torch.as_tensor(np.asarray(frames)) if not isinstance(frames, torch.Tensor) else frames
    if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise InputError(f"video frames must be uint8 of shape (frames, height, width, 3), got {video.dtype} "
                         f"{tuple(video.shape)}.")
    if video.shape[0] == 0:
        raise InputError("preprocess_video got no frames.")
    return video.permute(0, 3, 1, 2).contiguous()


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


# The ViT's config (VisionConfig) is read with every other config in config.py.


# ================================================================================ 2-D rotary
def vision_positions(grid_thw: torch.Tensor, merge: int = MERGE_SIZE) -> torch.Tensor:
    """(row, column) of every patch, in the patchify order (merge windows).  Returns (N, 2) long."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
        windows = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(windows).transpose(1, 2).flatten()
        cols = cols.reshape(windows).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # every frame has the same layout
    return torch.cat(out)


def vision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) for 2-D rotary, rotate-half layout.

    A quarter of the head's frequencies w_j = theta^(-4j/d) serve both axes: the angles are
    [row * w, col * w] (d/2 values), written twice so that dim i and dim i + d/2 share an angle.
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))  # (d/4,)
    angles = positions.float()[..., None] * freqs  # (N, 2, d/4)
    angles = angles.flatten(1)  # (N, d/2): row angles, then column angles
    angles = torch.cat([angles, angles], dim=-1)  # (N, d)
    return angles.cos(), angles.sin()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by the angle of dim i.  x: (N, H, d); cos, sin: (N, d)."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x32 * cos[:, None] + rotated_half * sin[:, None]).to(x.dtype)


# ================================================================================ ViT
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), CLIP's cheap approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """A 14x14x3 patch (588 numbers) -> one vector: a convolution with stride 14 is just a Linear."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.in_channels * config.patch_size ** 2, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 588) -> (N, width)
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention within each frame (patches of other frames are invisible)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rope, frame_lengths: list[int]) -> torch.Tensor:
        N, width = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, H, d) each
        q, k = apply_rope_half(q, *rope), apply_rope_half(k, *rope)
        outputs = []
        for qf, kf, vf in zip(*(t.split(frame_lengths) for t in (q, k, v))):  # one frame at a time
            o = F.scaled_dot_product_attention(qf.transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1))
            outputs.append(o.transpose(0, 1))  # (n, H, d)
        return self.proj(torch.cat(outputs).reshape(N, width))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block with LayerNorm (mean and bias, unlike the decoder's RMSNorm)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x, rope, frame_lengths):
        x = x + self.attn(self.norm1(x), rope, frame_lengths)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """The ViT (Hub prefix ``vision_model``): patches of all images/videos, packed -> features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 588), grid_thw (n, 3) with N = sum of t*h*w.  Returns (N, width)."""
        grid_thw = check_grid(pixel_values, grid_thw, self.config)
        head_dim = self.config.hidden_size // self.config.num_heads
        rope = vision_rope_angles(vision_positions(grid_thw, self.config.spatial_merge_size), head_dim,
                                  self.config.rope_theta)
        rope = tuple(r.to(pixel_values.device) for r in rope)
        frame_lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        x = self.patch_embed(pixel_values)  # (N, width)
        for block in self.blocks:
            x = block(x, rope, frame_lengths)
        return self.ln(x)


def check_grid(pixel_values: torch.Tensor, grid_thw, config: VisionConfig) -> torch.Tensor:
    """Reject pixel / grid combinations that cannot come from the preprocessor."""
    grid_thw = torch.as_tensor(grid_thw).long().cpu().reshape(-1, 3)
    patch_dim = config.in_channels * config.patch_size ** 2
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise InputError(f"pixel_values must be (patches, {patch_dim}), got {tuple(pixel_values.shape)}. "
                         "Make them with ernie_lab.vision.preprocess_images.")
    if (grid_thw <= 0).any() or (grid_thw[:, 1:] % config.spatial_merge_size).any():
        raise InputError(f"grid_thw rows must be positive with even heights and widths, got {grid_thw.tolist()}.")
    if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
        raise InputError(f"grid_thw {grid_thw.tolist()} describes {int(grid_thw.prod(-1).sum())} patches but "
                         f"pixel_values holds {pixel_values.shape[0]}. Pass the grid that came with the pixels.")
    return grid_thw


# ================================================================================ adapter
class MergeMLP(nn.Module):
    """Linear -> GELU -> Linear -> LayerNorm, applied after concatenating patches (or frames)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x))))


class VisionAdapter(nn.Module):
    """Hub prefix ``resampler_model``: ViT features -> decoder tokens, 4 patches x 2 frames per token.

        x_s = MLP_s( concat of a 2x2 window )                        (N/4, 4w)
        x_t = MLP_t( concat(frame 2k, frame 2k+1) )   image: (x_s, x_s)   (N/8, 4w)
        tokens = RMSNorm( W x_t )                                     (tokens, text width)
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        if config.temporal_merge_size != 2:
            raise ConfigError("vision_config.temporal_merge_size must be 2: the adapter merges frames in pairs.")
        merged = config.hidden_size * config.spatial_merge_size ** 2
        self.spatial_merge = MergeMLP(merged, merged, config.layer_norm_eps)
        self.temporal_merge = MergeMLP(merged * config.temporal_merge_size, merged, config.layer_norm_eps)
        self.proj = nn.Linear(merged, config.text_hidden_size)
        self.norm = RMSNorm(config.text_hidden_size, config.text_rms_norm_eps)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """features (N, width) from the ViT -> (tokens, text width), images/videos in order."""
        grid_thw = torch.as_tensor(grid_thw).long().cpu().reshape(-1, 3)
        windows = features.reshape(-1, features.shape[-1] * self.config.spatial_merge_size ** 2)  # (N/4, 4w)
        x = self.spatial_merge(windows)
        first, second = frame_pairs(grid_thw, self.config.spatial_merge_size)
        x = torch.cat([x[first.to(x.device)], x[second.to(x.device)]], dim=-1)  # (tokens, 8w)
        return self.norm(self.proj(self.temporal_merge(x)))


def frame_pairs(grid_thw: torch.Tensor, merge: int = MERGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (into the merged windows) of the first and second frame of every temporal pair.

    An image (t = 1) is paired with itself; a video of t frames gives t/2 pairs (frame 0 with 1, 2 with 3 ...).
    """
    first, second, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        per_frame = h * w // merge ** 2
        if t > 1 and t % 2:
            raise InputError(f"a video needs an even number of frames, got grid {[t, h, w]}; "
                             "preprocess_video repeats the last frame for you.")
        for k in range(0, t, 2):
            partner = k + 1 if t > 1 else k
            first.append(torch.arange(offset + k * per_frame, offset + (k + 1) * per_frame))
            second.append(torch.arange(offset + partner * per_frame, offset + (partner + 1) * per_frame))
        offset += t * per_frame
    return torch.cat(first), torch.cat(second)


def tokens_per_item(grid_thw: torch.Tensor, merge: int = MERGE_SIZE, temporal: int = TEMPORAL_MERGE) -> list[int]:
    """How many decoder tokens (placeholders) each image or video becomes."""
    return [t * h * w // merge ** 2 // (temporal if t > 1 else 1) for t, h, w in torch.as_tensor(grid_thw).tolist()]


# ================================================================================ Hub names
def hub_to_lab_vision(name: str) -> str | None:
    """Translate one Hub tensor name of the ViT or adapter (``hub_names.VISION_NAME_MAP``); None for any other."""
    return hub_to_lab(name, VISION_NAME_MAP)


def vision_state_from_hub(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Split a Hub state dict's vision tensors into (ViT state, adapter state) under ernie-lab names."""
    encoder, adapter = {}, {}
    for name, tensor in tensors.items():
        lab = hub_to_lab_vision(name)
        if lab is not None:
            part, rest = lab.split(".", 1)
            (encoder if part == "vision" else adapter)[rest] = tensor
    return encoder, adapter
