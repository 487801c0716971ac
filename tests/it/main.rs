//! Integration tests.
mod tools;
