"""snapsync: consistency-group snapshots, replication and GFS retention for btrfs and ZFS."""

__version__ = "0.1.0"
