"""A direct loop transcription of the DCNv3 sampling rule (spec §6), independent of grid_sample.

Slow; only for tiny shapes in tests. Used to check the reference backend itself.
"""

import math

import torch


def _bilinear(img, y, x):
    """img (H, W, gc) float64; explicit 4-neighbour bilinear with zeros outside, CUDA-kernel style."""
    H, W, gc = img.shape
    out = torch.zeros(gc, dtype=img.dtype)
    if y <= -1 or x <= -1 or y >= H or x >= W:
        return out
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    for yy, xx, w in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                      (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < H and 0 <= xx < W:
            out += w * img[yy, xx]
    return out


def dcnv3_naive(input, offset, mask, kh, kw, sh, sw, ph, pw, dh, dw, G, gc, scale, remove_center):
    input, offset, mask = input.double(), offset.double(), mask.double()
    N, H, W, _ = input.shape
    Ho, Wo = offset.shape[1], offset.shape[2]
    cw, ch = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    taps = [(i, j) for i in range(kw) for j in range(kh)
            if not (remove_center and i == kw // 2 and j == kh // 2)]
    P = len(taps)
    out = torch.zeros(N, Ho, Wo, G * gc, dtype=torch.float64)
    for n in range(N):
        for ho in range(Ho):
            for wo in range(Wo):
                for g in range(G):
                    img = input[n, :, :, g * gc:(g + 1) * gc]
                    acc = torch.zeros(gc, dtype=torch.float64)
                    for p, (i, j) in enumerate(taps):
                        dx = offset[n, ho, wo, (g * P + p) * 2].item()
                        dy = offset[n, ho, wo, (g * P + p) * 2 + 1].item()
                        x = wo * sw - pw + cw + (i * dw - cw + dx) * scale
                        y = ho * sh - ph + ch + (j * dh - ch + dy) * scale
                        acc += mask[n, ho, wo, g * P + p].item() * _bilinear(img, y, x)
                    out[n, ho, wo, g * gc:(g + 1) * gc] = acc
    return out
