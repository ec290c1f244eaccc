"""The one compiled piece of coplayer: its JACK MIDI client (see coplayer/io/_jackmidi.c).

Everything else is in pyproject.toml.  The library is loaded with ctypes and
opens libjack at run time, so it builds with any C compiler and no JACK
headers; where it cannot build (no compiler, Windows) coplayer installs
without it and uses python-rtmidi's ports.
"""

import sys

from setuptools import Extension, setup

setup(ext_modules=[] if sys.platform == "win32" else [
    Extension("coplayer.io._jackmidi", ["coplayer/io/_jackmidi.c"],
              libraries=["dl", "pthread"] if sys.platform.startswith("linux") else [],
              extra_compile_args=["-O2"], optional=True),
])
