# nip, built from this repository's Cargo workspace (only the `nip` binary), with the ncps shims:
# bin/ncps runs nip, bin/dbmate-ncps applies nip's migrations, so that nixpkgs'
# `services.ncps.package = nip;` works as well as `services.nip`.
{ lib, rustPlatform }:
let
  cargoToml = builtins.fromTOML (builtins.readFile ../Cargo.toml);
in
rustPlatform.buildRustPackage {
  pname = "nip";
  inherit (cargoToml.workspace.package) version;

  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../Cargo.toml
      ../Cargo.lock
      ../crates
    ];
  };
  cargoLock.lockFile = ../Cargo.lock;

  cargoBuildFlags = [
    "--package"
    "nip"
    "--bin"
    "nip"
  ];
  # The tests start servers, real Nix and PostgreSQL: they run in the repository's CI
  # (scripts/test.sh), not in the sandbox.
  doCheck = false;

  postInstall = ''
    install -Dm755 ${./shims/ncps} $out/bin/ncps
    install -Dm755 ${./shims/dbmate-ncps} $out/bin/dbmate-ncps
    substituteInPlace $out/bin/ncps $out/bin/dbmate-ncps --replace-fail '@nip@' "$out/bin/nip"
  '';

  meta = {
    description = "Remote binary cache for Nix and build artifacts; drop-in replacement for ncps";
    license = lib.licenses.asl20;
    mainProgram = "nip";
    platforms = lib.platforms.linux;
  };
}
