{
  description = "nip: a remote binary cache for Nix and build artifacts (drop-in replacement for ncps)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forEachSystem = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      # nix build .#nip: bin/nip, plus the ncps shims bin/ncps and bin/dbmate-ncps.
      packages = forEachSystem (pkgs: rec {
        nip = pkgs.callPackage ./nix/package.nix { };
        default = nip;
      });

      # pkgs.nip, e.g. for `services.ncps.package = pkgs.nip;`.
      overlays.default = final: _prev: { nip = final.callPackage ./nix/package.nix { }; };

      # services.nip: the options of services.ncps (see README, "ncps users", NixOS).
      nixosModules.nip = ./nix/module.nix;
      nixosModules.default = self.nixosModules.nip;
    };
}
