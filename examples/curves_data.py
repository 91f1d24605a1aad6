"""CURVES-style data: 28×28 images of smooth random curves, as in Hinton & Salakhutdinov (2006).

Each image shows one curve: three control points are drawn uniformly in the central
part of the square, the curve is the quadratic that passes through them
(at parameters 0, ½ and 1), and it is drawn with an antialiased pen — a pixel's
intensity is ``exp(−d²/(2w²))`` for its distance ``d`` to the curve, with pen width
``w = 0.9`` pixels — so intensities lie in [0, 1]. The original CURVES set (20,000
training and 10,000 test images) was made the same way from three random points; this
generator is deterministic for a seed and needs no download.
"""

import numpy as np

SIDE = 28


def make_curves(n, seed=0, pen_width=0.9, samples_per_curve=48, chunk=500):
    """Images of random smooth curves.

    Parameters
    ----------
    n : int
        Number of images.
    seed : int
        Seed of ``numpy.random.default_rng``; the same seed gives the same images.
    pen_width : float
        Standard deviation, in pixels, of the pen's Gaussian profile.
    samples_per_curve : int
        Points at which each curve is evaluated before drawing.
    chunk : int
        Images drawn at once (bounds the memory used).

    Returns
    -------
    ndarray, shape (n, 784), float32
        Row-major 28×28 images with intensities in [0, 1].
    """
    rng = np.random.default_rng(seed)
    control = rng.uniform(4, SIDE - 5, size=(n, 3, 2))  # (image, point, xy)
    t = np.linspace(0, 1, samples_per_curve)
    # Lagrange basis of the quadratic through parameters 0, 1/2, 1.
    basis = np.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)], axis=1)  # (S, 3)
    curves = np.einsum("sp,npx->nsx", basis, control)  # (n, S, 2)
    ys, xs = np.mgrid[0:SIDE, 0:SIDE]
    pixels = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)  # (784, 2)
    images = np.empty((n, SIDE * SIDE), dtype=np.float32)
    for start in range(0, n, chunk):
        c = curves[start:start + chunk].astype(np.float32)
        # |p − c|² = |p|² + |c|² − 2 p·c, minimized over the curve's samples
        d2 = (pixels**2).sum(1)[None, :, None] + (c**2).sum(2)[:, None, :] - 2 * (pixels @ c.transpose(0, 2, 1))
        images[start:start + chunk] = np.exp(-np.maximum(d2.min(axis=2), 0) / (2 * pen_width**2))
    return images
