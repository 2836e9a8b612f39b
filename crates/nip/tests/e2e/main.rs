//! Black-box tests: they start the real `nip` binary (and real Nix, where needed).
mod common;
mod nix_substitute;
