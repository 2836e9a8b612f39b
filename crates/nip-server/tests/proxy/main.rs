//! In-process tests of the Nix proxy against fake upstreams that can misbehave.
mod harness;

mod auth_abuse;
mod bad_input;
mod coalescing;
mod faults;
mod hostile_input;
mod jobs_lease;
mod ncps_compat;
mod prefetch;
mod serving;
mod staging_bound;
mod trust;
mod upstream_faults;
