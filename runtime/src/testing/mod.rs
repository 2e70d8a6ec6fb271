//! Test doubles for the daemon's unit tests: an in-memory agent, a
//! backend of such agents, and the services wired over them.

pub(crate) mod agent;
pub(crate) mod backend;
pub(crate) mod daemon;
