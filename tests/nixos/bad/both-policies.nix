# error: services.snapsync: set exactly one of policy (Nix attributes) and policyFile.
{ services.snapsync = { enable = true; policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; }; policyFile = "/run/secrets/snapsync.toml"; }; }
