# error: option `services.snapsync.policy.groups.forge.hooks."[definition 1-entry 1]".type' is not of type `one of "postgres", "sqlite", "freeze", "command"'
{
  services.snapsync = {
    enable = true;
    policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; hooks = [ { type = "pg_dump"; } ]; };
  };
}
