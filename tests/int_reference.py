"""An independent pure-integer (numpy int64) evaluation of a model file, for tests.

It reads the safetensors file directly and shares no code with ``wsi_idf.coding.integer_flow``.
"""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open


def conv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    k = w.shape[-1]
    pad = k // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[2:]
    out = np.zeros((x.shape[0], w.shape[0], h, wd), dtype=np.int64)
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("bchw,oc->bohw", xp[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx].astype(np.int64))
    return out


def layer(t: dict, key: str, x: np.ndarray) -> np.ndarray:
    acc = conv(x, t[f"{key}.weight"]) + t[f"{key}.bias"].astype(np.int64)[None, :, None, None]
    shift = t[f"{key}.shift"].astype(np.int64)[None, :, None, None]
    # floor(acc * 2**-shift) for either sign of shift, in integers
    y = np.where(shift >= 0, acc >> np.maximum(shift, 0), acc << np.maximum(-shift, 0))
    if f"{key}.lo" in t:
        y = np.clip(y, t[f"{key}.lo"][None, :, None, None], t[f"{key}.hi"][None, :, None, None])
    return y


def net(t: dict, prefix: str, blocks: int, z: np.ndarray) -> np.ndarray:
    h = np.clip(layer(t, f"{prefix}.0", np.clip(z, -256, 255)), 0, 127)
    for b in range(blocks):
        r = np.clip(layer(t, f"{prefix}.{1 + 2 * b}", h), 0, 127)
        h = np.clip(h + layer(t, f"{prefix}.{2 + 2 * b}", r), 0, 127)
    return layer(t, f"{prefix}.{1 + 2 * blocks}", h)


def unshuffle(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def forward(path: str, x: np.ndarray):
    """uint8 patches -> (outs, rows, centres, top), all int64, as the coder must see them."""
    t = load_file(path)
    with safe_open(path, framework="numpy") as f:
        cfg = json.loads(f.metadata()["wsi_idf"])["config"]
    z = unshuffle(x.astype(np.int64) - 128)
    outs, rows, centres = [], [], []
    for level in range(cfg["levels"]):
        for step in range(cfg["steps"]):
            z = z[:, t[f"perm.{level}.{step}"]]
            half = z.shape[1] // 2
            tr = net(t, f"coupling.{level}.{step}", cfg["blocks"], z[:, :half])
            z = np.concatenate([z[:, :half], z[:, half:] + tr], axis=1)
        if level < cfg["levels"] - 1:
            half = z.shape[1] // 2
            keep, out = z[:, :half], z[:, half:]
            p = net(t, f"prior.{level}", cfg["blocks"], keep)
            mean_q, scale_index = p[:, :out.shape[1]], p[:, out.shape[1]:]
            outs.append(out)
            centres.append(mean_q >> 3)  # MEAN_STEPS = 8
            rows.append(scale_index * 8 + (mean_q & 7))
            z = unshuffle(keep)
    return outs, rows, centres, z


# model v2: YCoCg-R and 5/3 lifting in int64 (floor division by 2 and 4 as arithmetic shifts)
V2_STEPS = (((0, 2), (1, 3), 3, "predict"), ((1, 3), (0, 2), 3, "update"),
            ((0, 1), (2, 3), 2, "predict"), ((2, 3), (0, 1), 2, "update"))


def _shifted(a: np.ndarray, axis: int, forward: bool) -> np.ndarray:
    n = a.shape[axis]
    idx = np.minimum(np.arange(n) + 1, n - 1) if forward else np.maximum(np.arange(n) - 1, 0)
    return np.take(a, idx, axis=axis)


def forward_wavelet(path: str, x: np.ndarray):
    """Model v2: uint8 patches -> (outs, rows, centres, top), all int64."""
    t = load_file(path)
    with safe_open(path, framework="numpy") as f:
        cfg = json.loads(f.metadata()["wsi_idf"])["config"]
    r, g, b = (x[:, i:i + 1].astype(np.int64) for i in range(3))
    co = r - b
    tmp = b + (co >> 1)
    cg = g - tmp
    z = np.concatenate([tmp + (cg >> 1) - 128, co, cg], axis=1)
    outs, rows, centres = [], [], []
    for level in range(cfg["levels"]):
        u = unshuffle(z)  # channel c * 4 + phase
        ph = [u[:, p::4] for p in range(4)]
        for step, (src, tgt, axis, kind) in enumerate(V2_STEPS):
            sources = np.concatenate([ph[k] for k in src], axis=1)
            learned = net(t, f"coupling.{level}.{step}", cfg["blocks"], sources)
            for i, k in enumerate(tgt):
                s = ph[src[i]]
                fixed = -((s + _shifted(s, axis, True)) >> 1) if kind == "predict" else (
                    (_shifted(s, axis, False) + s + 2) >> 2)
                ph[k] = ph[k] + fixed + learned[:, 3 * i:3 * i + 3]
        if level < cfg["levels"] - 1:
            high = np.concatenate(ph[1:], axis=1)
            p = net(t, f"prior.{level}", cfg["prior_blocks"], ph[0])
            if cfg["context_width"]:  # the odd checkerboard squares also see the even ones
                i, j = np.indices(high.shape[2:])
                even = (i + j) % 2 == 0
                c = net(t, f"context.{level}", cfg["prior_blocks"], np.concatenate([ph[0], high * even], axis=1))
                lo, hi = t[f"prior.{level}.{1 + 2 * cfg['prior_blocks']}.lo"], t[f"prior.{level}.{1 + 2 * cfg['prior_blocks']}.hi"]
                p = np.where(even, p, np.clip(p + c, lo[None, :, None, None], hi[None, :, None, None]))
            mean_q, scale_index = p[:, :9], p[:, 9:]
            outs.append(high)
            centres.append(mean_q >> 3)
            rows.append(scale_index * 8 + (mean_q & 7))
            z = ph[0]
        else:
            z = np.concatenate(ph, axis=1)
    return outs, rows, centres, z
