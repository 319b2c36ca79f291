"""Tissue detection on a low-resolution slide thumbnail (CLAM's recipe, in physical units).

The recipe follows CLAM's ``segmentTissue`` (Lu et al. 2021): HSV saturation, a median blur, a
LOW FIXED saturation threshold, morphological closing, then removal of small components (dust,
specks, debris) and filling of small holes. A fixed low threshold rather than Otsu is the point:
lightly stained, fatty or IHC-counterstained tissue has low saturation, and Otsu on saturation
splits strongly stained from pale tissue and drops much of the latter, whereas glass is almost
grey, so a threshold of 8 (on 0-255) keeps pale tissue and leaves glass out.

Every size is physical (µm, µm²) and converted with the thumbnail's mpp, so the mask does not
depend on which pyramid level the thumbnail was read from.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

__all__ = ["GRAYSCALE_NOTE", "is_grayscale", "tissue_mask"]

_CROSS = ndi.generate_binary_structure(2, 1)
_SQUARE = ndi.generate_binary_structure(2, 2)

# A pixel has colour when its channels differ by more than _GREY_SPREAD (JPEG leaves grey within
# 1); an image has none when at most _COLOURED_FRACTION of its pixels do (a few coloured specks,
# a label or ruler, do not make a grey scan a colour one). It shows something when at least
# _CONTENT_FRACTION of its pixels are darker than _CONTENT_VALUE (glass is ~240): blank glass is
# no evidence of a grayscale slide, only of an empty one.
_GREY_SPREAD = 3
_COLOURED_FRACTION = 1e-3
_CONTENT_VALUE = 220
_CONTENT_FRACTION = 0.01
GRAYSCALE_NOTE = (
    "the slide is grayscale (no colour anywhere in its thumbnail: a single-channel image, or "
    "red = green = blue everywhere), and tissue detection thresholds colour saturation, so it "
    "needs a colour (RGB) brightfield slide such as H&E or IHC"
)


def tissue_mask(
    thumbnail: np.ndarray,
    mpp: float,
    *,
    saturation_threshold: int = 8,
    black_threshold: int = 30,
    median_um: float = 48.0,
    closing_um: float = 64.0,
    min_tissue_area_um2: float = 50_000.0,
    max_hole_area_um2: float = 100_000.0,
) -> np.ndarray:
    """Boolean tissue mask of a slide thumbnail.

    Steps: RGBA is composited over white (transparent = glass); a pixel is a tissue candidate if
    its HSV saturation is at least ``saturation_threshold`` and its HSV value (brightest channel)
    at least ``black_threshold``; a median filter of ``median_um`` smooths the candidates; a
    closing with a disk of ``closing_um`` joins tissue across thin gaps; connected components
    (8-connected) smaller than ``min_tissue_area_um2`` are removed; holes (4-connected background
    not touching the border) smaller than ``max_hole_area_um2`` are filled.

    Defaults, and why:
        - ``saturation_threshold=8``: CLAM's ``sthresh``. Glass averages about 0-6 (its pixel
          noise reaches higher; the median removes it), pale eosin, fat and IHC counterstain
          roughly 10-40, strong stains far more.
        - ``black_threshold=30``: pixels whose brightest channel is below 30 are black dust,
          scanner fill outside the slide or focus artefacts; their hue is noise and their
          saturation is often high. Tissue in a thumbnail, being averaged, is rarely that dark.
        - ``median_um=48``: finer than CLAM's 7 pixels at its 16 µm/px segmentation level
          (112 µm), so the mask follows tissue edges to well within a tile (224 px at 0.5 mpp
          is 112 µm); it still removes pixel noise and fibres or scratches thinner than ~24 µm
          (a median keeps a strand only if it is wider than half the window).
        - ``closing_um=64``: CLAM's 4-pixel closing at 16 µm/px; bridges cracks and pale seams
          between tissue regions.
        - ``min_tissue_area_um2=50_000`` (0.05 mm², a ~225 µm square, four 112 µm tiles): dust,
          specks and debris are smaller; a fragment smaller than this yields hardly any tile that
          is half tissue. CLAM's default (about 1.6 mm² at 40x) is tuned for resections and would
          drop biopsy fragments.
        - ``max_hole_area_um2=100_000`` (0.1 mm², a ~316 µm square): small lumens, vessels and
          cracks inside tissue count as tissue; big lumens, cysts and tears stay background.

    The median filter is applied to the binary candidate mask, which is the same as thresholding
    the median-blurred saturation (the median of a window is >= t iff more than half the window
    is >= t) but runs as a box filter, in constant time per pixel whatever the window. The disk
    is approximated by an octagon (a square then a diamond), the usual fast decomposition.

    Not handled: pen marks (green, blue, black ink) and a strongly tinted background are
    saturated enough to count as tissue; remove or white-balance them before calling this.
    Nearly grey tissue (loose pale stroma, mucin) at the edge of a section falls below the
    threshold; inside a section it is kept by the closing and hole filling.

    Args:
        thumbnail: ``[h, w, 3]`` RGB or ``[h, w, 4]`` RGBA image, uint8.
        mpp: Microns per pixel of the thumbnail (typically 2-16).
        saturation_threshold: Minimum HSV saturation (0-255) of tissue.
        black_threshold: Minimum HSV value (0-255) of tissue.
        median_um: Width of the square median window in µm, rounded to an odd number of
            pixels (0 disables it).
        closing_um: Diameter of the closing disk in µm (0 disables it).
        min_tissue_area_um2: Tissue components smaller than this (µm²) are removed.
        max_hole_area_um2: Holes in tissue up to this area (µm²) are filled.

    Returns:
        ``[h, w]`` bool mask, True where there is tissue.

    Example:
        >>> import numpy as np
        >>> thumb = np.full((200, 200, 3), 242, np.uint8)
        >>> thumb[50:150, 50:150] = (236, 222, 228)  # pale pink tissue on white glass
        >>> mask = tissue_mask(thumb, mpp=8.0)
        >>> bool(mask[100, 100]), bool(mask[10, 10]), round(float(mask.mean()), 2)
        (True, False, 0.25)
    """
    rgb = _validated_rgb(thumbnail, mpp)
    levels = {"saturation_threshold": saturation_threshold, "black_threshold": black_threshold}
    for name, value in levels.items():
        if not 0 <= value <= 255:
            raise ValueError(f"Expected `{name}` in [0, 255], but got {value}")
    sizes = {
        "median_um": median_um,
        "closing_um": closing_um,
        "min_tissue_area_um2": min_tissue_area_um2,
        "max_hole_area_um2": max_hole_area_um2,
    }
    for name, value in sizes.items():
        if not value >= 0:
            raise ValueError(f"Expected `{name}` to be >= 0, but got {value}")

    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cmax = np.maximum(np.maximum(red, green), blue).astype(np.uint16)
    cmin = np.minimum(np.minimum(red, green), blue).astype(np.uint16)
    # HSV saturation on 0-255 is 255 * (max - min) / max (as OpenCV computes it), compared here
    # without dividing. Pure black (max 0) has no saturation: it is never tissue.
    mask = 255 * (cmax - cmin) >= saturation_threshold * cmax
    mask &= cmax >= max(black_threshold, 1)

    size = _odd(median_um / mpp)
    if size > 1:
        mask = ndi.uniform_filter(mask.astype(np.float32), size, mode="reflect") > 0.5

    radius = closing_um / (2 * mpp)
    if radius >= 0.5:
        mask = _closing(mask, radius)

    px_area = mpp * mpp
    labels, n = ndi.label(mask, structure=_SQUARE)
    if n:
        keep = np.bincount(labels.ravel()) * px_area >= min_tissue_area_um2
        keep[0] = False
        mask = keep[labels]

    # Holes: background components (4-connected, the dual of 8-connected tissue) that do not
    # touch the border. One labelling instead of binary_fill_holes' iterative flood.
    labels, n = ndi.label(~mask, structure=_CROSS)
    if n:
        fill = np.bincount(labels.ravel()) * px_area <= max_hole_area_um2
        fill[0] = False
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        fill[edge] = False
        mask |= fill[labels]
    return mask


def is_grayscale(thumbnail: np.ndarray) -> bool:
    """Whether an RGB(A) thumbnail shows something but has no colour: why saturation-based
    detection finds no tissue on it.

    True when at most 0.1% of the pixels have channels more than 3 levels apart (JPEG keeps grey
    within 1) and at least 1% are darker than 220 (content, not just glass). Fluorescence
    channels, grayscale scans and single-channel TIFFs (which OpenSlide returns with
    R = G = B) are grayscale; H&E and IHC slides are not, and neither is blank glass.

    Example:
        >>> import numpy as np
        >>> grey = np.full((64, 64, 3), 240, np.uint8)
        >>> grey[16:48, 16:48] = 120  # grey "tissue" on grey glass
        >>> pink = grey.copy(); pink[16:48, 16:48] = (236, 200, 220)
        >>> is_grayscale(grey), is_grayscale(pink), is_grayscale(np.full((8, 8, 3), 240, np.uint8))
        (True, False, False)
    """
    rgb = np.asarray(thumbnail)[..., :3]
    if rgb.size == 0:
        return False
    cmax, cmin = rgb.max(axis=-1), rgb.min(axis=-1)
    coloured = np.count_nonzero(cmax.astype(np.int16) - cmin > _GREY_SPREAD)
    content = np.count_nonzero(cmax < _CONTENT_VALUE)
    return bool(
        coloured <= _COLOURED_FRACTION * cmax.size and content >= _CONTENT_FRACTION * cmax.size
    )


def _validated_rgb(thumbnail: np.ndarray, mpp: float) -> np.ndarray:
    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[2] not in (3, 4) or thumbnail.dtype != np.uint8:
        raise ValueError(
            "Expected `thumbnail` to be a uint8 array [h, w, 3] (RGB) or [h, w, 4] (RGBA), "
            f"but got {thumbnail.dtype} {list(thumbnail.shape)}"
        )
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"Expected `mpp` (microns per pixel) to be positive, but got {mpp}")
    if thumbnail.shape[2] == 3:
        return thumbnail
    # Transparent pixels are outside the scanned area: composite over white, i.e. glass.
    alpha = thumbnail[..., 3:].astype(np.float32) / 255
    rgb = thumbnail[..., :3] * alpha + 255 * (1 - alpha)
    return np.rint(rgb).astype(np.uint8)


def _odd(pixels: float) -> int:
    """Nearest odd window size >= 1."""
    return max(1, 2 * int(math.floor(pixels / 2)) + 1)


def _closing(mask: np.ndarray, radius: float) -> np.ndarray:
    """Closing with an octagon of the given radius (px): a square, then a diamond.

    The image is edge-padded first so tissue cut by the border is neither eroded nor bridged to
    the border.
    """
    r = int(round(radius))
    square = int(round(r * (math.sqrt(2) - 1)))  # axis extent square + diamond = r,
    diamond = r - square  # diagonal extent sqrt(2) * (square + diamond / 2) ~ r
    padded = np.pad(mask, r + 1, mode="edge")
    for structure, iterations in ((_SQUARE, square), (_CROSS, diamond)):
        if iterations:
            padded = ndi.binary_dilation(padded, structure, iterations)
    for structure, iterations in ((_SQUARE, square), (_CROSS, diamond)):
        if iterations:
            padded = ndi.binary_erosion(padded, structure, iterations, border_value=1)
    return padded[r + 1 : -(r + 1), r + 1 : -(r + 1)]
