//! Integration tests of prism-wal, one module per concern.

mod common;
mod corpus;
mod faults;
mod format;
mod gaps;
mod group_commit;
mod ledger;
mod lock;
mod model;
mod reader;
mod recovery;
mod reserve;
mod retention;
