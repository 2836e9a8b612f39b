//! The nip client library: remote cache configuration, the `/v1` HTTP client, the local binary
//! cache, recipes and cache keys, the `nip build` flow and the operation record behind
//! `nip cache stats`. The binary crate only parses arguments and prints.
pub mod artifact;
pub mod build;
pub mod client;
pub mod config;
pub mod dirs;
pub mod error;
pub mod key;
pub mod local;
pub mod ops;
pub mod pkgs;
pub mod progress;
pub mod recipe;
pub mod record;
pub mod remote;
pub mod unreachable;
pub mod worker;

pub use client::Client;
pub use error::{ClientError, Result};
