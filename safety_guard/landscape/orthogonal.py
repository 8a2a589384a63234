"""Several directions made orthogonal tensor by tensor (Gram–Schmidt), without holding any
direction whole: on slices (:func:`direction_slices`) or, for streamable random directions, as
coefficients of their raw Gaussians (:func:`orthogonal_coefficients`).

Example:
    >>> gram_schmidt_rows([[1.0, 0.0], [0.0, 1.0]], [2.0, 3.0], [False, False])
    [[2.0, 0.0], [0.0, 3.0]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from safety_guard.landscape.directions import Direction, RandomDirection

__all__ = ["direction_slices", "gram_schmidt_rows", "orthogonal_coefficients"]


def orthogonal_coefficients(
    directions: Sequence[RandomDirection], name: str, numel: int, origin_squared_norm: float
) -> list[list[float]]:
    """Gram–Schmidt of streamable random directions, as coefficients of their raw Gaussians.

    Row j holds the c_ji with Σᵢ c_ji·gᵢ = direction j's slice of ``name`` orthogonalized
    against the earlier ones and rescaled to its own norm — what :func:`direction_slices`
    computes from whole slices — found from the scales and the Gram matrix of the raw Gaussian
    slices (float64, one pass per pair) instead. A move then streams each Gaussian once with a
    combined coefficient: no whole slice is held, and a shard adds its index range of the same
    sum (FSDP2: the Gram matrix is of the whole tensor, so no rank needs another's shard).

    Example:
        >>> dirs = [RandomDirection(seed=0), RandomDirection(seed=1)]
        >>> rows = orthogonal_coefficients(dirs, "w", 4096, origin_squared_norm=4.0)
        >>> rows[0][1], abs(rows[1][0]) < 0.05 * rows[1][1]  # the first unchanged; the second mostly its own
        (0.0, True)
    """
    n = len(directions)
    if any(not d.streamable for d in directions):
        raise ValueError("orthogonal_coefficients() needs layer- or un-normalized directions.")
    scales = [d.scale_for(name, numel, origin_squared_norm) for d in directions]
    gram = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for k in range(i, n):
            gram[i][k] = gram[k][i] = directions[i].gaussian_dot(directions[k], name, numel)
    return gram_schmidt_rows(gram, scales, [True] * n)


def gram_schmidt_rows(
    gram: Sequence[Sequence[float]], scales: Sequence[float], rescale: Sequence[bool]
) -> list[list[float]]:
    """Gram–Schmidt in coefficients: base vector j times ``scales[j]``, orthogonalized against
    the earlier ones in order, as row j of coefficients on the base vectors, found from their
    Gram matrix alone; where ``rescale[j]``, the orthogonalized vector (after the first) is
    brought back to its own norm — what :func:`direction_slices` does to random slices.

    Example:
        >>> gram_schmidt_rows([[1.0, 1.0], [1.0, 2.0]], [1.0, 1.0], [False, False])
        [[1.0, 0.0], [-1.0, 1.0]]
    """
    n = len(scales)

    def dot(u: list[float], v: list[float]) -> float:
        return sum(u[i] * gram[i][k] * v[k] for i in range(n) for k in range(n))

    rows: list[list[float]] = []
    for j in range(n):
        v = [0.0] * n
        v[j] = scales[j]
        target = math.sqrt(max(dot(v, v), 0.0))
        for prev in rows:
            denom = dot(prev, prev)
            if denom > 0:
                w = dot(v, prev) / denom
                v = [a - w * b for a, b in zip(v, prev, strict=True)]
        if rows and rescale[j]:
            norm = max(math.sqrt(max(dot(v, v), 0.0)), 1e-12)
            v = [a * target / norm for a in v]
        rows.append(v)
    return rows


def direction_slices(
    directions: Sequence[Direction],
    name: str,
    origin: torch.Tensor,
    orthogonalize: bool = True,
) -> list[torch.Tensor | None]:
    """The slices of several directions for one tensor, Gram–Schmidt orthogonalized in order.

    Orthogonalizing every tensor's slices makes the whole directions orthogonal without ever
    holding them whole. An orthogonalized random slice is rescaled back to its normalized norm.
    """
    slices: list[torch.Tensor | None] = []
    for direction in directions:
        s = direction.tensor(name, origin)
        if orthogonalize and s is not None:
            target_norm = s.norm()
            for prev in slices:
                if prev is None:
                    continue
                denom = prev.pow(2).sum()
                if denom > 0:
                    s.sub_(prev, alpha=float((s * prev).sum() / denom))
            if slices and isinstance(direction, RandomDirection):
                s.mul_(target_norm / s.norm().clamp_min(1e-12))
        slices.append(s)
    return slices
