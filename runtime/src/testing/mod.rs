//! Test doubles for the daemon's unit tests: they stand in for what a pod
//! VM would provide, so CRI rules can be tested in seconds without KVM.

pub(crate) mod agent;
