//! Integration tests: the vmlab binary end to end. Tests that boot VMs use TCG
//! unless VMLAB_ACCEL says otherwise.

mod common;

mod abuse;
mod build;
mod coverage;
mod datachan;
mod drive;
mod guest;
mod network;
mod nix;
mod nixapi;
mod nixdriver;
mod runtime;
mod script;
mod snapshot;
mod startscript;
