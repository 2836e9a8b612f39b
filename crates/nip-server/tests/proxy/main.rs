//! In-process tests of the Nix proxy against fake upstreams that can misbehave.
mod harness;

mod bad_input;
mod coalescing;
mod faults;
mod hostile_input;
mod jobs_lease;
mod ncps_compat;
mod serving;
mod trust;
mod upstream_faults;
