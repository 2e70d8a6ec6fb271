//! Host filesystem operations on trees a guest may have influenced.
//!
//! The rule they share: a path is never resolved through a symlink or
//! out of the directory it starts in, and mounts are told apart by mount
//! ID, never by comparing path strings (mountinfo records the resolved
//! path, which a symlink can steer). `beneath` opens and creates,
//! `mounts` binds and unbinds onto fds, `remove` deletes a tree with a
//! bounded number of fds and without crossing a mount.

pub mod beneath;
pub mod mounts;
pub mod remove;
