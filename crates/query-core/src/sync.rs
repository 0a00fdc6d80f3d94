//! Locks that outlive a panic: a thread that panicked while holding one left nothing half-done
//! that the next holder could trip on (every critical section here is a swap or a push).

use std::sync::{Mutex, MutexGuard};

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
