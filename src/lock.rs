//! One way to lock a mutex shared with HTTP handlers, callbacks and background tasks.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, taking its data even when a thread panicked while holding it: the values
/// behind these locks (positions, readiness, rate-limit clocks) stay meaningful after such a
/// panic, and a poisoned lock must not take the service down with it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
