//! PHI masking in the data plane: mask plans and values, detectors and their prefilter, the
//! identifier dictionaries, error scrubbing, rules pushed by the control plane, and the row guard
//! that matches every row to its statement.

pub mod candidates;
pub mod copy;
pub mod dates;
pub mod detectors;
pub mod dictionary;
pub mod dictionary_set;
pub mod pair_filter;
pub mod plan;
pub mod prefilter;
pub mod rowguard;
pub mod rules;
pub mod scrub;
pub mod start_filter;
pub mod tokens;
pub mod values;

#[cfg(test)]
mod mask_tests;

/// Asks the CPU to bring the cache line of `x` in now, to be read a little later (the
/// dictionary's tables and bitsets, when they are too large to stay in cache between rows).
#[inline(always)]
pub(crate) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, and `x` is a valid reference anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((x as *const T).cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}
