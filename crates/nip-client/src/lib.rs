//! The nip client library.
