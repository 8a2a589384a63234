"""PNG plots of safety landscapes and of training-guard trajectories.

Figures are drawn with :class:`matplotlib.figure.Figure` and the Agg canvas directly, never through
``pyplot``, so plotting neither needs a display nor changes the backend a notebook or script has
chosen. Files are written atomically (temporary file in the same folder, then rename).

* :func:`plot_landscape` — a 1D landscape: ASR (%) against α for every direction, with each
  direction's safety basin shaded, the edge threshold dashed, and the capability (NLL of the
  reference answers) in a panel below; or a 2D landscape: a filled ASR contour over (α, β) and a
  3D surface.
* :func:`plot_trajectory` — a finetune watched by the training guard: the ASR rise of the
  current model and of the points ahead on its line against the promise, with warnings, the halt
  and its reason, the adapter put back and the safety ETA; and the weight displacement against
  the step, compared with the displacement at which a point ahead passed the promise.
* :func:`plot_path` — a finetune's probed states over a 2D landscape spanned by its own
  direction and a random one, with the ASR along its line.

One module each: :mod:`~safety_guard.plots.landscape`, :mod:`~safety_guard.plots.trajectory`,
:mod:`~safety_guard.plots.path`, and what they share, :mod:`~safety_guard.plots.common`.

Example:
    >>> from safety_guard.plots import plot_landscape
    >>> plot_landscape("landscape.json", "plots/landscape.png")  # doctest: +SKIP
    PosixPath('plots/landscape.png')
"""

from safety_guard.plots.common import require_matplotlib
from safety_guard.plots.landscape import plot_landscape
from safety_guard.plots.path import plot_path
from safety_guard.plots.trajectory import plot_trajectory

__all__ = ["plot_landscape", "plot_path", "plot_trajectory", "require_matplotlib"]
