# The policy keys the module declares, with their enums, as a tree: tests compare it with the schema.
{ lib ? import ./vendor/nixpkgs-lib/lib }:

let
  nixos = import ./nixos.nix { inherit lib; };
  ev = nixos.evaluate [ ../../deploy/nixos/module.nix ];
  submoduleOf = t:
    if t.name == "submodule" then t
    else if t ? nestedTypes.elemType then submoduleOf t.nestedTypes.elemType
    else null;
  describe = t:
    let sub = submoduleOf t; in
    if sub != null then { keys = tree (sub.getSubOptions [ ]); }
    else if t.name == "enum" then { enum = t.functor.payload.values or t.functor.payload; }
    else if t ? nestedTypes.elemType then describe t.nestedTypes.elemType
    else { type = t.description; };
  tree = opts: lib.mapAttrs (_: o: if lib.isOption o then describe o.type else { keys = tree o; })
    (lib.filterAttrs (name: _: !lib.hasPrefix "_" name) opts);
in
describe ev.options.services.snapsync.policy.type
