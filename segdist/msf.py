"""Multi-scale (+ flip) sliding-window inference as a small wrapper module.

    msf = MultiScaleInference(model, scales=(0.5, 0.75, 1, 1.25, 1.5), flip=True, tile_size=321)
    probs = msf(images)          # [N, C, H, W] softmax probabilities, float32
    pred = probs.argmax(1)

Like kazuto1011/deeplab-pytorch's `MSC`, it wraps any segmentation model and is itself an
nn.Module; unlike MSC (max over scales of logits, for training) it is the evaluation
protocol of the results log:

* every scale s: the image is resized (bilinear) to round(s*H) x round(s*W);
* with `tile_size` c: the scaled image is padded at the bottom/right with 0 (= the mean
  after normalisation) to at least c x c and cut into c x c tiles whose origins are
  0, d, 2d, ... with stride d = ceil(2c/3) (1/3 overlap), the last tile of a row/column
  aligned to the image end; each tile's softmax probabilities are summed into the
  scaled-size map and divided by the number of tiles covering each pixel (averaged on
  overlaps); the padding is cut off. Tiles are run `tile_batch` at a time;
  with `tile_size=None` the scaled image is run whole (one forward, no padding);
* flip: every tile (or the whole scaled image) is also run mirrored left-right and its
  probabilities mirrored back; that is flipping the image with a mirrored tile grid;
* each scale's map is resized back to H x W (bilinear) and the maps are averaged over
  scales and flips (equal weights).

Memory: one scale at a time. Besides the model's activations for one tile batch, it holds
the running H x W sum and one scaled-size map (+ its padded image), never all scales at
once; a 1024x2048 Cityscapes image at scale 1.5 with 19 classes needs about
0.4 GB for the scaled map and 0.16 GB for the sum.

Edge-input variants: an input with 4 channels (RGB + Canny map, as val_loader(edges=True)
gives) is split into model(rgb, edges) when `model.needs_edges`; the edge channel is
resized, padded (0) and flipped with the image.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def tile_stride(tile: int) -> int:
    """ceil(2/3 * tile): consecutive tiles overlap by (at least) a third."""
    return math.ceil(2 * tile / 3)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis of `length` (>= tile) so that every pixel is covered;
    the last tile ends exactly at `length`."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _as_pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


class MultiScaleInference(nn.Module):
    """Wraps `model` (logits [N, C, h, w] at input size); forward returns averaged softmax
    probabilities [N, C, H, W] (float32). See the module docstring for the protocol."""

    def __init__(
        self,
        model: nn.Module,
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        tile_size: int | tuple[int, int] | None = None,
        tile_batch: int = 4,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        scales = tuple(float(s) for s in scales)
        if not scales or any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise ValueError(f"scales must be positive numbers, got {scales}")
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
        self.model = model
        self.scales = scales
        self.flip = bool(flip)
        self.tile_size = None if tile_size in (None, 0) else _as_pair(tile_size)
        if self.tile_size is not None and min(self.tile_size) < 1:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        self.tile_batch = int(tile_batch)
        self.amp_dtype = amp_dtype
        self.channels_last = bool(channels_last)
        self.tiles_run = 0  # forward passes' worth of tiles (flipped copies included), for tests/benchmarks

    # ------------------------------------------------------------------ model call

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with autocast:
            if getattr(self.model, "needs_edges", False):
                if x.shape[1] < 4:
                    raise ValueError("this model needs an edge map: give images with 4 channels (RGB + edges)")
                return self.model(x[:, :3], x[:, 3:4])
            return self.model(x[:, :3] if x.shape[1] > 3 else x)

    def _probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of a batch, averaged with the mirrored pass when flip."""
        batch = torch.cat([x, x.flip(-1)]) if self.flip else x
        self.tiles_run += batch.shape[0]
        probs = self._logits(batch).float().softmax(dim=1)
        if self.flip:
            n = x.shape[0]
            probs = 0.5 * (probs[:n] + probs[n:].flip(-1))
        return probs

    # ------------------------------------------------------------------ one scale

    def _sliding(self, image: torch.Tensor) -> torch.Tensor:
        """One image [1, Ch, h, w] -> probabilities [1, C, h, w] by overlapping tiles."""
        th, tw = self.tile_size
        _, _, h, w = image.shape
        ph, pw = max(h, th), max(w, tw)
        if (ph, pw) != (h, w):
            image = F.pad(image, (0, pw - w, 0, ph - h), value=0.0)  # mean after normalisation
        ys = tile_starts(ph, th, tile_stride(th))
        xs = tile_starts(pw, tw, tile_stride(tw))
        origins = [(y, x) for y in ys for x in xs]
        total = None
        count = torch.zeros(1, 1, ph, pw, device=image.device, dtype=torch.float32)
        for start in range(0, len(origins), self.tile_batch):
            chunk = origins[start : start + self.tile_batch]
            tiles = torch.cat([image[:, :, y : y + th, x : x + tw] for y, x in chunk])
            probs = self._probs(tiles)
            if total is None:
                total = torch.zeros(1, probs.shape[1], ph, pw, device=image.device, dtype=torch.float32)
            for k, (y, x) in enumerate(chunk):
                total[:, :, y : y + th, x : x + tw] += probs[k : k + 1]
                count[:, :, y : y + th, x : x + tw] += 1
            del probs, tiles
        total /= count
        return total[:, :, :h, :w]

    def _scale_probs(self, image: torch.Tensor, scale: float) -> torch.Tensor:
        _, _, h, w = image.shape
        size = scaled_size(h, w, scale)
        scaled = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        probs = self._probs(scaled) if self.tile_size is None else self._sliding(scaled)
        if size != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        return probs

    # ------------------------------------------------------------------ forward

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = []
        for n in range(images.shape[0]):
            image = images[n : n + 1]
            total = None
            for scale in self.scales:
                probs = self._scale_probs(image, scale)
                if total is None:
                    total = probs if len(self.scales) == 1 else probs.clone()
                else:
                    total += probs
                del probs
            outputs.append(total / len(self.scales) if len(self.scales) > 1 else total)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def extra_repr(self) -> str:
        return f"scales={list(self.scales)}, flip={self.flip}, tile_size={self.tile_size}, tile_batch={self.tile_batch}"
