"""Note data: the note table, MIDI files, corpora and splits."""
