//! placeholder
pub mod sink;
