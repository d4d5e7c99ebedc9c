//! The provider contract against `provider = "file"`.

mod backends;
mod common;
mod contract;
mod softhsm;

contract_tests!(backends::file::FileBackend);
