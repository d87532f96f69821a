# error: option `services.snapsync.receive.authorizedKeys."[definition 1-entry 1]"' is not of type `public key line
# The module adds the options (restrict, the forced command); a key line with its own would give sshd an invalid line.
{ boot.supportedFilesystems = [ "zfs" ]; services.snapsync.receive = { enable = true; backend = "zfs"; root = "tank/backup"; authorizedKeys = [ "from=\"10.0.0.1\" ssh-ed25519 AAAA root@forge" ]; }; }
