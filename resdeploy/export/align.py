"""Step 2 of the short-path engine: pair the ONNX graph's short paths with the reference's.

An edit-distance alignment of the two ordered lists: pairing two short paths costs 0 when every structural fact
agrees (:meth:`ShortPath.key`, the output shape, and a scaled add's scale) and 1 otherwise; a missing or an extra
short path costs 1. A short path that forks from the one just before it (a block after a block) must be paired
after its predecessor's pair, or its pairing costs 1 too: blocks that look alike then pair in order. Ties go to
pairing, so a removed skip is reported at its own block and the next block as forking from the wrong place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from resdeploy.export.discover import ShortPath

Pairs = list[tuple[int | None, int | None]]
SCALE_RTOL = 1e-3  # a scale written as float32 (or dequantized) differs from the Python float by far less


def shape_matches(onnx_shape: tuple[object, ...] | None, torch_shape: tuple[object, ...] | None) -> bool:
    """ONNX dims the file leaves unknown (None) match anything; named dims cannot occur past the batch axis."""
    if onnx_shape is None or torch_shape is None:
        return True
    return len(onnx_shape) == len(torch_shape) and all(d is None or d == t for d, t in zip(onnx_shape, torch_shape))


def scales_agree(a: float, b: float) -> bool:
    return abs(a - b) <= SCALE_RTOL * max(abs(b), 1e-12)


def align_by(cost: Callable[[int, int], int], n: int, m: int,
             chained: Callable[[int, int], bool | None] | None = None) -> Pairs:
    """Edit-distance alignment of two ordered lists of lengths ``n`` and ``m``: ``cost(i, j)`` for pairing (0 when
    every structural fact agrees), 1 for a missing or extra item; ties go to pairing.

    ``chained(i, j)``: True when both items fork from the item just before them, None when neither does, False
    when one does and the other does not. A chained pair costs at least 1 unless the items before it are paired
    too, and a False one always does: identical blocks in a row then pair in order, and a removed skip is blamed
    on its own block rather than on a look-alike neighbour."""
    inf = float("inf")
    diag = [[inf] * (m + 1) for _ in range(n + 1)]  # best cost with (i-1, j-1) paired last
    gap = [[inf] * (m + 1) for _ in range(n + 1)]  # best cost with a missing or extra item last (or nothing yet)
    gap[0][0] = 0

    def pair(i: int, j: int, after_pair: bool) -> int:
        c = cost(i, j)
        link = chained(i, j) if chained is not None else None
        return max(c, 1) if link is False or (link and not after_pair) else c

    for i in range(n + 1):
        for j in range(m + 1):
            if i and j:
                diag[i][j] = min(diag[i - 1][j - 1] + pair(i - 1, j - 1, True),
                                 gap[i - 1][j - 1] + pair(i - 1, j - 1, False))
            if i:
                gap[i][j] = min(gap[i][j], min(diag[i - 1][j], gap[i - 1][j]) + 1)
            if j:
                gap[i][j] = min(gap[i][j], min(diag[i][j - 1], gap[i][j - 1]) + 1)
    pairs: Pairs = []
    i, j, last_pair = n, m, diag[n][m] <= gap[n][m]
    while i > 0 or j > 0:
        here = diag[i][j] if last_pair else gap[i][j]
        if last_pair:
            pairs.append((i - 1, j - 1))
            last_pair = diag[i - 1][j - 1] + pair(i - 1, j - 1, True) == here
            i, j = i - 1, j - 1
        elif j > 0 and min(diag[i][j - 1], gap[i][j - 1]) + 1 == here:
            pairs.append((None, j - 1))
            last_pair = diag[i][j - 1] <= gap[i][j - 1]
            j -= 1
        else:
            pairs.append((i - 1, None))
            last_pair = diag[i - 1][j] <= gap[i - 1][j]
            i -= 1
    return pairs[::-1]


def align(paths: Sequence[ShortPath], tpaths: Sequence[ShortPath], *, quantized: bool = False) -> Pairs:
    """Pair the ONNX short paths ``paths`` with the reference's ``tpaths`` (see the module docstring)."""
    okeys = [p.key() for p in paths]
    tkeys = [t.key() for t in tpaths]

    def cost(i: int, j: int) -> int:
        a, b = paths[i], tpaths[j]
        if okeys[i] != tkeys[j] or not shape_matches(a.shape, b.shape):
            return 1
        # Blocks that differ only by their scale (stochastic depth's survival probabilities) pair by the scale.
        if a.kind == b.kind == "scaled_add" and a.scale is not None and b.scale is not None and not quantized:
            return 0 if scales_agree(a.scale, b.scale) else 1
        return 0

    def chained(i: int, j: int) -> bool | None:
        o, t = 0 <= paths[i].position[0] == i - 1, 0 <= tpaths[j].position[0] == j - 1
        return None if not (o or t) else o == t

    return align_by(cost, len(paths), len(tpaths), chained)


def block_near(pairs: Pairs, k: int, blocks: Sequence[str]) -> str:
    """The reference block an unmatched ONNX item (pair ``k``) sits in: the next matched one's, else the previous."""
    for _, j in pairs[k:]:
        if j is not None:
            return blocks[j]
    for _, j in reversed(pairs[:k]):
        if j is not None:
            return blocks[j]
    return ""


def matched_neighbours(pairs: Pairs, k: int, nodes: Sequence[str]) -> tuple[str, str]:
    """The ONNX nodes matched before and after pair ``k``: where a missing item should have been."""
    prev = next((nodes[a] for a, _ in reversed(pairs[:k]) if a is not None), "the input")
    nxt = next((nodes[a] for a, _ in pairs[k + 1:] if a is not None), "the output")
    return prev, nxt
