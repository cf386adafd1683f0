"""Launch-grid limits shared by the kernels' wrappers."""

# CUDA's limit on a grid's second and third axes. The elementwise kernels put the batch on axis 1 (a sample's
# coefficients and keys are per program), so a batch past it is launched in slices of at most this many samples.
MAX_GRID_Y = 65_535


def batch_slices(batch: int, per_launch: int = MAX_GRID_Y):
    """(start, stop) ranges of at most ``per_launch`` samples covering ``batch`` (one range for any real batch)."""
    per_launch = max(1, per_launch)
    return [(b0, min(batch, b0 + per_launch)) for b0 in range(0, batch, per_launch)]
