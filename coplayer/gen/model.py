"""The contract between a continuation model and the runtime that samples from it.

A model holds a context of known events (``feed``) and answers, for the NEXT
event, the logits of one field given the fields of that event already chosen
(``field_logits``).  The sampler (``coplayer.gen.sampler``) decides; the model
only scores.  Implementations: ``coplayer.gen.runner.OnnxEventModel`` (the
transformer through onnxruntime) and ``coplayer.gen.markov`` (the baseline).

Events are rows of the fields in ``FIELDS`` order (:mod:`coplayer.gen.encoding`);
``pos`` is each event's position in its bar, in grid ticks from the last
barline of the music's own meter (3/4: 0..35 at 12 ticks per beat), as
:func:`coplayer.gen.data.encode_arrays` computes it for the training data.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from coplayer.gen.encoding import Encoding


@runtime_checkable
class EventModel(Protocol):
    encoding: Encoding
    name: str

    def reset(self) -> None:
        """Forget all context."""
        ...

    def feed(self, events: np.ndarray, pos: np.ndarray) -> None:
        """Append known events [N,5] (+ positions in bar [N]) to the context; N may be large (prefill)."""
        ...

    def field_logits(self, field: str, partial: dict[str, int]) -> np.ndarray:
        """Float64 logits (or log-probs) over the classes of ``field`` for the NEXT event.

        ``partial`` holds the fields of that event already chosen, in
        ``FIELDS`` order (all fields before ``field``).
        """
        ...

    def fork(self) -> "EventModel":
        """Optional cheap copy of the state (may raise NotImplementedError)."""
        ...
