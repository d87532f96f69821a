# error: services.snapsync: set exactly one of policy (Nix attributes) and policyFile.
{ services.snapsync.enable = true; }
