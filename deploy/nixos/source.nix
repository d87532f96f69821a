# What the package is built from: pyproject.toml, README.md (its readme) and the snapsync package's
# modules and data, nothing else. The checkout's .venv, .hypothesis, caches and tests would change the
# source hash whenever the tests run.
{ lib }:

let
  root = ../..;
  wanted = rel: type:
    rel == "pyproject.toml" || rel == "README.md" || rel == "snapsync"
    || lib.hasPrefix "snapsync/" rel && (
      if type == "directory" then baseNameOf rel != "__pycache__"
      else lib.hasSuffix ".py" rel || lib.hasPrefix "snapsync/data/" rel && lib.hasSuffix ".toml" rel
    );
in
lib.cleanSourceWith {
  name = "snapsync-source";
  src = root;
  filter = path: type: wanted (lib.removePrefix "${toString root}/" (toString path)) type;
}
