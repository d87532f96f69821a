# error: option `services.snapsync.policy.version' is not of type `value 1 (singular enum)'
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; policy.version = 2; }; }
