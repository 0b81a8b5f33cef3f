"""Network dissection of hidden units and their sensitivity to adversarial examples.

Bau et al. (2017); docs/METHODS.md §4. One job per module:

- :mod:`.metric`: the ``Dissection`` Metric (``analysis=dissection``): prepare, update,
  compute, report;
- :mod:`.probe`: the probe passes (activations, thresholds, disk cache, IoU tallies),
  reduced exactly across processes; :mod:`.showcase`: the top images of the report;
- :mod:`.activations`, :mod:`.cache`: truncated forward passes and their on-disk cache;
- :mod:`.quantiles`: exact streaming per-unit thresholds; :mod:`.masks`: upsampled unit
  masks; :mod:`.tally`: IoU tallies and top-k selection;
- :mod:`.sensitivity`: unit sensitivity from streamed sums;
- :mod:`.statistics`: pure statistics on per-unit tensors; :mod:`.summary`: one layer's
  scalars;
- :mod:`.figures`, :mod:`.report`: the report section, from ``compute()``'s result alone.
"""

from pse_lightning.analysis.dissection.metric import Dissection

__all__ = ["Dissection"]
