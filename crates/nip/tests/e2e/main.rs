//! Black-box tests: they start the real `nip` binary (and real Nix, where needed).
mod ci_docs;
mod client_build;
mod client_env;
mod client_status;
mod common;
mod ncps_compat;
mod nix_fixture;
mod nix_substitute;
mod nix_upload;
mod ops_observe;
mod ops_store;
mod scale_out;
mod tls_https;
mod v1_artifacts;
mod v1_auth_matrix;
