//! Pure domain types shared by the nip server and client: no I/O lives here.
pub mod api;
pub mod base32;
pub mod hash;
pub mod nar_file;
pub mod narinfo;
pub mod redact;
pub mod signing;
pub mod store_path;
