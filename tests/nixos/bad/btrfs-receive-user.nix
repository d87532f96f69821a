# error: services.snapsync.receive: btrfs receive needs root; set user = "root".
{ services.snapsync.receive = { enable = true; backend = "btrfs"; root = "/srv/backup"; }; }
