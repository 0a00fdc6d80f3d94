//! What may live in the shared region: types for which all-zero bytes are a valid value and that
//! processes can read and write at the same time without data races.
//!
//! [`Shared`] says so of a type. Only this crate implements it (the trait is sealed): for the
//! atomics, for arrays of shared types, and — through [`shared_struct!`] — for `repr(C)` structs
//! whose fields the compiler has checked are all shared. The mapping ([`crate::Scoreboard::map`])
//! relies on nothing else.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64};

mod sealed {
    pub trait Sealed {}
}

/// A type valid when all-zero and safe to share between processes through a `MAP_SHARED`
/// mapping: it is made only of atomics, and laid out without padding holes that a zeroed page
/// could not fill (`repr(C)`).
///
/// # Safety
///
/// Implemented only in this crate, for atomics, arrays of `Shared` types and structs declared
/// with [`shared_struct!`].
#[allow(unsafe_code)]
pub unsafe trait Shared: sealed::Sealed {}

/// Fails to compile unless `T` is [`Shared`].
pub const fn assert_shared<T: Shared>() {}

macro_rules! shared_atomics {
    ($($atomic:ty),*) => {$(
        impl sealed::Sealed for $atomic {}
        // SAFETY: an atomic integer is valid when zero (it is 0), and every access to it is
        // atomic, so processes may share it.
        #[allow(unsafe_code)]
        unsafe impl Shared for $atomic {}
    )*};
}
shared_atomics!(AtomicI32, AtomicU32, AtomicU64);

impl<T: Shared, const N: usize> sealed::Sealed for [T; N] {}
// SAFETY: an array of shared elements has no padding between them and is valid when zeroed if
// each element is.
#[allow(unsafe_code)]
unsafe impl<T: Shared, const N: usize> Shared for [T; N] {}

/// Declare a struct of the shared region: `repr(C)`, and [`Shared`] only if every field's type
/// is (the compiler checks it here, so that the mapping's safety argument cannot go stale when a
/// field is added). A struct may take one `const N: usize` parameter.
macro_rules! shared_struct {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident $(<const $n:ident: usize>)? {
            $( $(#[$field_meta:meta])* $field_vis:vis $field:ident : $ty:ty ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[repr(C)]
        $vis struct $name $(<const $n: usize>)? {
            $( $(#[$field_meta])* $field_vis $field: $ty ),*
        }

        impl $(<const $n: usize>)? $crate::shared::Sealed for $name $(<$n>)? {}
        // SAFETY: `repr(C)`, and every field is `Shared`: checked by `check` below, which only
        // compiles if each field type satisfies the bound.
        #[allow(unsafe_code)]
        unsafe impl $(<const $n: usize>)? $crate::shared::Shared for $name $(<$n>)? {}
        const _: () = {
            #[allow(dead_code)]
            fn check $(<const $n: usize>)? () {
                $( $crate::shared::assert_shared::<$ty>(); )*
            }
        };
    };
}
pub(crate) use shared_struct;

pub(crate) use sealed::Sealed;
