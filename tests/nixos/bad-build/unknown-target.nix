# error: groups.forge.targets
# Nix's types cannot see that the target is not defined; the build's `snapsync policy check --syntax-only` does.
{
  services.snapsync = {
    enable = true;
    policy.groups.forge = { backend = "btrfs"; datasets = [ "/persist/system/var/lib/forgejo" ]; targets = [ "nas" ]; };
  };
}
