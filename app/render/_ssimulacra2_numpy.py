"""SSIMULACRA2 in NumPy: what q=auto scores with where the compiled module could not be built.

The same formula and quirks as `_ssimulacra2.c` (see there), on whole float32 planes: the scores
agree with it within 0.01, at about 8x its CPU (BENCHMARKS.md, "q=auto: the metric"). setup.py
builds the compiled module when the machine has a C compiler and the Python headers; without
them the install goes on, and app/render/ssimulacra2.py falls back to this module. The interface
is the compiled one's: Reference(rgb, width, height), .scales, .score(rgb).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

Planes = NDArray[np.float32]  # shape (3, height, width)

_NUM_SCALES = 6
_C2 = 0.0009
_SIGMA = 1.5
_RADIUS = 5  # scipy's int(truncate * sigma + 0.5) with the reference's truncate=3.33

_OPSIN = np.array(
    [[0.30, 0.622, 0.078], [0.23, 0.692, 0.078], [0.24342268924547819, 0.20476744424496821, 0.5518098665095536]],
    dtype=np.float32,
)
_BIAS = np.float32(0.0037930732552754493)
_CBRT_BIAS = np.float32(np.cbrt(0.0037930732552754493))

_WEIGHTS = np.array([
    0.0, 0.0007376606707406586, 0.0, 0.0, 0.0007793481682867309, 0.0, 0.0, 0.0004371155730107379, 0.0,
    1.1041726426657346, 0.00066284834129271, 0.00015231632783718752, 0.0, 0.0016406437456599754, 0.0,
    1.8422455520539298, 11.441172603757666, 0.0, 0.0007989109436015163, 0.000176816438078653, 0.0,
    1.8787594979546387, 10.94906990605142, 0.0, 0.0007289346991508072, 0.9677937080626833, 0.0,
    0.00014003424285435884, 0.9981766977854967, 0.00031949755934435053, 0.0004550992113792063, 0.0, 0.0,
    0.0013648766163243398, 0.0, 0.0, 0.0, 0.0, 0.0, 7.466890328078848, 0.0, 17.445833984131262,
    0.0006235601634041466, 0.0, 0.0, 6.683678146179332, 0.00037724407979611296, 1.027889937768264,
    225.20515300849274, 0.0, 0.0, 19.213238186143016, 0.0011401524586618361, 0.001237755635509985,
    176.39317598450694, 0.0, 0.0, 24.43300999870476, 0.28520802612117757, 0.0004485436923833408, 0.0, 0.0,
    0.0, 34.77906344483772, 44.835625328877896, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    0.0008680556573291698, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0005313191874358747, 0.0, 0.00016533814161379112,
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0004179171803251336, 0.0017290828234722833, 0.0, 0.0020827005846636437,
    0.0, 0.0, 8.826982764996862, 23.19243343998926, 0.0, 95.1080498811086, 0.9863978034400682,
    0.9834382792465353, 0.0012286405048278493, 171.2667255897307, 0.9807858872435379, 0.0, 0.0, 0.0,
    0.0005130064588990679, 0.0, 0.00010854057858411537,
])  # fmt: skip


def _gaussian_taps() -> NDArray[np.float32]:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / _SIGMA) ** 2)
    return (taps / taps.sum()).astype(np.float32)


_TAPS = _gaussian_taps()


def _srgb_table() -> NDArray[np.float32]:
    v = np.arange(256, dtype=np.float64) / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)


_LINEAR = _srgb_table()


def linear_planes(rgb: bytes, width: int, height: int) -> Planes:
    """Packed RGB bytes as linear-light float32 planes (3, height, width)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"expected {width * height * 3} bytes of RGB for {width}x{height}, got {len(rgb)}")
    pixels = np.frombuffer(rgb, dtype=np.uint8).reshape(height, width, 3)
    return np.ascontiguousarray(_LINEAR[pixels].transpose(2, 0, 1))


def _xyb(linear: Planes) -> Planes:
    """Linear RGB -> the positive XYB the metric works in."""
    mixed = np.tensordot(_OPSIN, linear, axes=1)
    mixed += _BIAS
    np.maximum(mixed, 0, out=mixed)
    np.cbrt(mixed, out=mixed)
    mixed -= _CBRT_BIAS
    m0, m1, m2 = mixed
    out = np.empty_like(mixed)
    out[0] = (m0 - m1) * np.float32(0.5 * 14.0) + np.float32(0.42)
    y = (m0 + m1) * np.float32(0.5)
    out[1] = y + np.float32(0.01)
    out[2] = (m2 - y) + np.float32(0.55)
    return out


def _blur(planes: Planes) -> Planes:
    """The reference's Gaussian: mirrored past the top and bottom, zeros past the sides.

    Two 1-D passes of the 11 symmetric taps, written with `out=` so each tap is three passes
    over memory and no new array: allocation and page faults cost as much as the arithmetic."""
    c, h, w = planes.shape
    r = _RADIUS
    # Vertical: half-sample mirror ("reflect", which repeats the edge row); the scale loop
    # stops before a side drops under 8 px, so the mirror always has r rows to take.
    padded = np.empty((c, h + 2 * r, w), dtype=np.float32)
    padded[:, r : r + h] = planes
    padded[:, :r] = planes[:, r - 1 :: -1]
    padded[:, r + h :] = planes[:, : h - r - 1 : -1]
    vertical = np.multiply(planes, _TAPS[r])
    pair = np.empty_like(vertical)
    for k in range(r):
        np.add(padded[:, k : k + h], padded[:, 2 * r - k : 2 * r - k + h], out=pair)
        pair *= _TAPS[k]
        vertical += pair
    # Horizontal, zeros beyond the sides.
    padded = np.zeros((c, h, w + 2 * r), dtype=np.float32)
    padded[:, :, r : r + w] = vertical
    out = np.multiply(vertical, _TAPS[r], out=vertical)
    for k in range(r):
        np.add(padded[:, :, k : k + w], padded[:, :, 2 * r - k : 2 * r - k + w], out=pair)
        pair *= _TAPS[k]
        out += pair
    return out


def _downsample(linear: Planes) -> Planes:
    """2x2 box average; an odd last row or column averages the pixels it has."""
    _, h, w = linear.shape
    if h % 2:
        linear = np.concatenate([linear, linear[:, -1:, :]], axis=1)
    if w % 2:
        linear = np.concatenate([linear, linear[:, :, -1:]], axis=2)
    out = linear[:, 0::2, 0::2] + linear[:, 1::2, 0::2] + linear[:, 0::2, 1::2] + linear[:, 1::2, 1::2]
    out *= np.float32(0.25)
    return out


def _norms(d: Planes) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per plane: the mean, and the 4th root of the mean 4th power."""
    mean = d.mean(axis=(1, 2), dtype=np.float64)
    d2 = d * d
    return mean, (np.mean(d2 * d2, axis=(1, 2), dtype=np.float64)) ** 0.25


class _Scale:
    """One scale of the reference: what every candidate is compared with, computed once."""

    def __init__(self, linear: Planes) -> None:
        self.xyb = _xyb(linear)
        self.mu = _blur(self.xyb)
        self.sigma = _blur(self.xyb * self.xyb) - self.mu * self.mu
        self.detail = 1.0 + np.abs(self.xyb - self.mu)

    def stats(self, linear: Planes) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """This scale's 6 SSIM and 12 edge figures for a candidate, in the reference's order.
        One plane at a time: the temporaries are then a third of the size (the peak memory)."""
        xyb = _xyb(linear)
        ssim, edge = np.empty(6), np.empty(12)
        for c in range(3):
            plane = slice(c, c + 1)
            img1, img2, mu1 = self.xyb[plane], xyb[plane], self.mu[plane]
            mu2 = _blur(img2)
            s22 = _blur(img2 * img2)
            s12 = _blur(img1 * img2)
            diff = mu1 - mu2
            num_m = 1.0 - diff * diff
            num_s = 2.0 * (s12 - mu1 * mu2) + np.float32(_C2)
            denom_s = self.sigma[plane] + (s22 - mu2 * mu2) + np.float32(_C2)
            d = np.maximum(1.0 - num_m * num_s / denom_s, 0.0, dtype=np.float32)
            ssim[2 * c], ssim[2 * c + 1] = (v[0] for v in _norms(d))
            ratio = (1.0 + np.abs(img2 - mu2)) / self.detail[plane] - 1.0
            edge[4 * c], edge[4 * c + 1] = (v[0] for v in _norms(np.maximum(ratio, 0.0)))
            edge[4 * c + 2], edge[4 * c + 3] = (v[0] for v in _norms(np.maximum(-ratio, 0.0)))
        return ssim, edge


class Reference:
    """A reference image prepared once, to score many candidates against (the q=auto search)."""

    def __init__(self, rgb: bytes, width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"bad size {width}x{height}")
        linear = linear_planes(rgb, width, height)
        self.size = (width, height)
        self._scales: list[_Scale] = []
        for scale in range(_NUM_SCALES):
            if linear.shape[1] < 8 or linear.shape[2] < 8:
                break
            self._scales.append(_Scale(linear))
            if scale < _NUM_SCALES - 1:
                linear = _downsample(linear)

    @property
    def scales(self) -> int:
        return len(self._scales)

    def score(self, rgb: bytes) -> float:
        """SSIMULACRA2 of packed RGB bytes of the reference's size; 100 = identical."""
        distorted = linear_planes(rgb, *self.size)
        if not self._scales:
            return 100.0
        stats = []
        for index, scale in enumerate(self._scales):
            if index:
                distorted = _downsample(distorted)
            stats.append(scale.stats(distorted))
        return _final(stats)


def _final(scales: list[tuple[NDArray[np.float64], NDArray[np.float64]]]) -> float:
    total = 0.0
    i = 0
    for c in range(3):
        for ssim, edge in scales:
            for n in range(2):
                total += _WEIGHTS[i] * abs(ssim[c * 2 + n])
                total += _WEIGHTS[i + 1] * abs(edge[c * 4 + n])
                total += _WEIGHTS[i + 2] * abs(edge[c * 4 + n + 2])
                i += 3
    total *= 0.9562382616834844
    total = 2.326765642916932 * total - 0.020884521182843837 * total**2 + 6.248496625763138e-05 * total**3
    return 100.0 - 10.0 * total**0.6276336467831387 if total > 0 else 100.0
