//! Integration tests: the vmlab binary end to end. Tests that boot VMs use TCG
//! unless VMLAB_ACCEL says otherwise.

mod support;

mod abuse;
mod build;
mod coverage;
mod datachan;
mod guest;
mod network;
mod nix_eval;
mod nix_network;
mod nix_run_test;
mod nixapi;
mod nixdriver;
mod script;
mod snapshot;
mod startscript;
mod test_command;
mod up;
