# Evaluates each case (a list of NixOS modules) together with deploy/nixos/module.nix and the NixOS
# stand-in (nixos.nix) with nixpkgs' lib.evalModules, and reports what the system would get.
{ lib ? import ./vendor/nixpkgs-lib/lib, cases }:

let
  nixos = import ./nixos.nix { inherit lib; };
  module = ../../deploy/nixos/module.nix;
in
lib.mapAttrs (_: modules: nixos.report (nixos.evaluate ([ module ] ++ modules))) cases
