# error: services.snapsync.receive.backend = "zfs" needs ZFS on this host (boot.supportedFilesystems.zfs = true).
{ services.snapsync.receive = { enable = true; backend = "zfs"; root = "tank/backup"; }; }
