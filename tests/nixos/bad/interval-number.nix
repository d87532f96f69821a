# error: option `services.snapsync.policy.groups.forge.interval' is not of type `null or duration
# A duration is a string ("5m"); a bare number used to get through to the run.
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; interval = 5; }; }; }
