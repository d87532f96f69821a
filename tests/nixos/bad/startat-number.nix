# error: option `services.snapsync.startAt' is not of type `string or list of string'
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; startAt = 5; }; }
