# error: option `services.snapsync.policy.targets.b2.key_file' is not of type `null or string'
# A Nix path would copy the offsite key into the world-readable store.
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; policy.targets.b2 = { type = "s3"; bucket = "b"; key_file = ./key-file-path.nix; }; }; }
