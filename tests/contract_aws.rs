//! The provider contract against `provider = "aws-kms"`, on a real moto emulator (one
//! per test).

#![cfg(feature = "aws-kms")]

#[path = "backends/aws.rs"]
mod aws_backend;
mod common;
mod contract;
#[path = "support/moto.rs"]
mod moto;

contract_tests!(aws_backend::AwsBackend::start());
