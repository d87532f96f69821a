# error: option `services.snapsync.policy' is not of type `null or (open submodule of (TOML value))'
# A policy written as TOML text instead of Nix attributes.
{ services.snapsync = { enable = true; policy = "version = 1\n"; }; }
