"""The pure core: retention, snapshot names, group, replication and offsite planning. No I/O; time is injected."""
