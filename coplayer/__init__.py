"""coplayer: a real-time MIDI co-performer (instrumentation and continuation).

The runtime package never imports torch; training lives in ``models/`` and
export in ``export/``.
"""

__version__ = "0.1.0"
