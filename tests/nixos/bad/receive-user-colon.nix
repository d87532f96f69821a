# error: option `services.snapsync.receive.user' is not of type `string, not containing newlines or colons'
{ boot.supportedFilesystems = [ "zfs" ]; services.snapsync.receive = { enable = true; backend = "zfs"; root = "tank/backup"; user = "snap:sync"; }; }
