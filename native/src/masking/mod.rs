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
