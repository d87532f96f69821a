# error: services.snapsync.receive.root: a directory (/...) for btrfs, a dataset name (pool/...) for zfs; got "/tank/backup" with backend = "zfs".
{ boot.supportedFilesystems = [ "zfs" ]; services.snapsync.receive = { enable = true; backend = "zfs"; root = "/tank/backup"; }; }
