"""Which timesteps a respaced (shorter) Gaussian process keeps, ADM's `space_timesteps` rules.

A respaced process keeps a subset S of the original steps and uses betas
1 - abar[s_k] / abar[s_{k-1}], so its cumulative alphas equal the original ones at every kept step
(IDDPM §4). The spec is ADM's:
  "25" or 25         25 steps spread evenly over [0, T-1], both ends included (DiT's sampling default)
  "10,15,20"         the range cut into 3 equal sections holding 10, 15 and 20 evenly spread steps
  "ddim50"           the DDIM paper's striding range(0, T, k) with the integer k that gives 50 steps
"""

from __future__ import annotations


def _spread(start: int, size: int, count: int) -> list[int]:
    """`count` indices spread evenly over [start, start + size), first and last included."""
    if count > size:
        raise ValueError(f"cannot take {count} steps from a section of {size} steps")
    if count <= 0:
        raise ValueError(f"each section needs at least one step, got {count}")
    if count == 1:
        return [start]
    stride, position, out = (size - 1) / (count - 1), 0.0, []
    for _ in range(count):              # accumulated float position, rounded: ADM's exact choice
        out.append(start + round(position))
        position += stride
    return out


def space_timesteps(num_timesteps: int, spec: int | str) -> list[int]:
    """Sorted original timesteps kept by respacing spec `spec` (see module docstring)."""
    if isinstance(spec, str) and spec.startswith("ddim"):
        try:
            count = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"bad respacing {spec!r}: expected 'ddimN' with an integer N") from None
        for stride in range(1, num_timesteps + 1):
            if len(range(0, num_timesteps, stride)) == count:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"respacing {spec!r}: no integer stride gives {count} of {num_timesteps} steps")
    if isinstance(spec, str):
        try:
            counts = [int(c) for c in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {spec!r}: expected an int, 'N', 'N1,N2,...' or 'ddimN'"
            ) from None
    elif isinstance(spec, int) and not isinstance(spec, bool):
        counts = [spec]
    else:
        raise TypeError(f"bad respacing {spec!r}: expected an int, 'N', 'N1,N2,...' or 'ddimN'")
    base, extra = divmod(num_timesteps, len(counts))
    kept, start = [], 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        kept += _spread(start, size, count)
        start += size
    return sorted(set(kept))
