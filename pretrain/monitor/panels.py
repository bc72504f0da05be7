"""Image panels for TensorBoard: a grid of input images, and learned DCN sampling points over an image.

Images are returned as uint8 tensors (3, H, W) for `SummaryWriter.add_image(..., dataformats="CHW")`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# distinct colours for the query points of the DCN panel
_COLOURS = [(255, 64, 64), (64, 255, 64), (64, 160, 255), (255, 220, 0), (255, 0, 255), (0, 255, 255)]


def to_uint8(images: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(..., 3, H, W) normalised float -> uint8 in [0, 255] (per-image min/max if the stats do not fit)."""
    x = images.detach().float().cpu()
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = x * s + m
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def image_grid(images: torch.Tensor, max_images: int = 16, pad: int = 2) -> torch.Tensor:
    """(B, 3, H, W) normalised -> one uint8 (3, H', W') grid of the first `max_images`."""
    x = to_uint8(images[:max_images])
    b, _, h, w = x.shape
    cols = int(b**0.5 + 0.999)
    rows = (b + cols - 1) // cols
    grid = torch.zeros(3, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(b):
        r, c = divmod(i, cols)
        grid[
            :, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w
        ] = x[i]
    return grid


def draw_points(
    image: torch.Tensor, queries: list[tuple[float, float]], points: list[torch.Tensor]
) -> torch.Tensor:
    """Draw each query (x, y) as a square and its sampling points (P, 2) as dots, in pixels of `image`.

    image: uint8 (3, H, W). Returns a new uint8 (3, H, W).
    """
    from PIL import Image, ImageDraw

    pil = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(pil)
    for k, ((qx, qy), pts) in enumerate(zip(queries, points)):
        colour = _COLOURS[k % len(_COLOURS)]
        for px, py in pts.tolist():
            draw.ellipse((px - 1.5, py - 1.5, px + 1.5, py + 1.5), fill=colour)
        draw.rectangle((qx - 3, qy - 3, qx + 3, qy + 3), outline=(255, 255, 255), width=2)
    return torch.from_numpy(__import__("numpy").asarray(pil).copy()).permute(2, 0, 1)


class DCNProbe:
    """Records the learned offsets of one DCNv3 module during a training forward and draws its sampling points.

    A forward hook on the module's depthwise branch (`dw_conv`, whose output x1 feeds the offset projection)
    computes `offset = x1 W_off^T + b_off` for the first sample while armed: exactly the module's own offsets,
    computed inside the forward where the parameters are present even under ZeRO-3 (calling submodules
    outside the forward would disturb ZeRO-3's prefetch trace). `render` maps them to pixel locations with
    `pretrain.ops.sampling_locations`.
    """

    def __init__(self, backbone: nn.Module):
        from pretrain.models import DCNv3

        dcns = [(n, m) for n, m in backbone.named_modules() if isinstance(m, DCNv3)]
        if not dcns:
            raise ValueError("the backbone has no DCNv3 module")
        # the stride-16 stage (levels.2) is where most blocks and the widest receptive fields live
        stage16 = [(n, m) for n, m in dcns if n.startswith("levels.2.")]
        self.name, self.module = (stage16 or dcns)[-1]
        self.armed = False
        self.offset: torch.Tensor | None = None
        self._handle = self.module.dw_conv.register_forward_hook(self._hook)

    @torch.no_grad()
    def _hook(self, module, args, x1):
        if self.armed and self.offset is None:
            w = self.module.offset.weight
            self.offset = F.linear(x1[:1].to(w.dtype), w, self.module.offset.bias).float()

    def arm(self) -> None:
        self.armed, self.offset = True, None

    def disarm(self) -> None:
        self.armed, self.offset = False, None

    @torch.no_grad()
    def render(self, image: torch.Tensor, queries: int = 4, min_size: int = 256) -> torch.Tensor | None:
        """image: normalised (3, S, S), the sample whose offsets were recorded -> uint8 panel, or None."""
        from pretrain.ops import sampling_locations

        offset, self.offset, self.armed = self.offset, None, False
        if offset is None or offset.numel() == 0:
            return None
        _, h, wd, _ = offset.shape
        xs, ys = sampling_locations(self.module.geom, offset, h, wd)  # (1, Ho, Wo, G, P) feature pixels
        ho, wo = xs.shape[1:3]
        canvas = to_uint8(image)
        if canvas.shape[-1] < min_size:  # small inputs are enlarged so the points stay visible
            factor = -(-min_size // canvas.shape[-1])
            canvas = canvas.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
        size = canvas.shape[-1]
        scale = size / wd  # feature pixel -> image pixel (centres: (p + 0.5) * scale)
        picks = [
            (ho // 4, wo // 4),
            (ho // 4, 3 * wo // 4),
            (3 * ho // 4, wo // 4),
            (3 * ho // 4, 3 * wo // 4),
            (ho // 2, wo // 2),
        ][:queries]
        qs, pts = [], []
        for r, c in picks:
            qs.append(((c + 0.5) * scale, (r + 0.5) * scale))
            px = (xs[0, r, c].reshape(-1) + 0.5) * scale
            py = (ys[0, r, c].reshape(-1) + 0.5) * scale
            pts.append(torch.stack([px, py], -1))
        return draw_points(canvas, qs, pts)

    def remove(self) -> None:
        self._handle.remove()
