//! vmig: a live-migration agent for KVM virtual machines.
//!
//! The agent is the VMM of its host's VMs ([`vm`]), runs the guest programs of [`guest`],
//! tracks dirty pages ([`dirty`]), and moves VMs between hosts over the migration stream
//! ([`wire`], [`transport`], [`migrate`]).

pub mod api;
pub mod certs;
pub mod dirty;
pub mod fuzzing;
pub mod guest;
pub mod inventory;
pub mod migrate;
pub mod plot;
pub mod storage;
pub mod transport;
pub mod vm;
pub mod wire;
