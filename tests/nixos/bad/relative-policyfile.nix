# error: option `services.snapsync.policyFile' is not of type `null or
{ services.snapsync = { enable = true; policyFile = "policy.toml"; }; }
