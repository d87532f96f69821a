# snapsync as a Nix package, built from this source tree (the files source.nix lets through):
#   pkgs.python3Packages.callPackage ./package.nix { }
{ lib, buildPythonApplication, setuptools, pydantic, typer, rich, tenacity, btrfsutil, tzdata, tomli-w
, psycopg, boto3, cryptography, zstandard, prometheus-client }:

buildPythonApplication {
  pname = "snapsync";
  version = (lib.importTOML ../../pyproject.toml).project.version;
  pyproject = true;
  src = import ./source.nix { inherit lib; };
  build-system = [ setuptools ];
  dependencies = [
    pydantic typer rich tenacity btrfsutil tzdata tomli-w psycopg boto3 cryptography zstandard prometheus-client
  ];
  # The test suite needs root, loop devices and real servers: it runs in CI, not in the sandbox.
  doCheck = false;
  # pyproject caps btrfsutil for PyPI's sdists; nixpkgs builds it from btrfs-progs, whatever its version.
  pythonRelaxDeps = [ "btrfsutil" ];
  pythonImportsCheck = [ "snapsync" ];
  meta = {
    description = "Consistency-group snapshots of btrfs subvolumes and ZFS datasets, replication, GFS retention";
    mainProgram = "snapsync";
  };
}
