# error: services.snapsync.stateDir must be below /var/lib
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; stateDir = "/persist/snapsync"; }; }
