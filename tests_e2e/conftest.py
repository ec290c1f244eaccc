"""End-to-end tests through a real JACK server, part of ``make test``.

The ``jack_server`` fixture (tests/conftest.py) uses a running server or
starts the dummy driver with real-time scheduling where allowed; without a
server they skip, and on CI (the CI environment variable) they fail.
"""

from tests.conftest import jack_server  # noqa: F401  (the fixture)
