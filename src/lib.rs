//! placeholder
pub mod tools;
