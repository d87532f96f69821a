# error: option `services.snapsync.policy.defaults.retention.daily' is not of type `null or integer between 0 and 100000
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; policy.defaults.retention.daily = -1; }; }
