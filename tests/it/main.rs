//! Integration tests.

mod sink;
