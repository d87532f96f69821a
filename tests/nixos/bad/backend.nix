# error: option `services.snapsync.policy.groups.forge.backend' is not of type `one of "btrfs", "zfs"'
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "ext4"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; }; }
