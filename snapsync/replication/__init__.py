"""Replication between hosts: the wire protocol's two ends, the transports, and carrying out plans."""
