# A policy file kept beside the configuration: copied into the store and checked when the system is built.
{
  services.snapsync = {
    enable = true;
    policyFile = ./policy.toml;
  };
}
