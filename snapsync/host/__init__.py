"""This host's plumbing: private files, locks, state, logs, and byte streams between processes."""
