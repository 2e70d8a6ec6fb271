//! Locking std mutexes without poisoning: a thread that panicked while
//! holding one leaves data that every writer here keeps consistent at
//! each step, so the next caller takes it as it is.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking over a poisoned lock.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
