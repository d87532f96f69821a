"""The policy file: its schema, its loading with one-line errors, durations as people write them."""
