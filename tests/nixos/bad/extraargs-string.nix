# error: option `services.snapsync.extraArgs' is not of type `list of string'
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; extraArgs = "--lock-timeout 300"; }; }
