"""Offsite copies in object storage: the archive's layout, chunks, sealing, the store, uploads."""
