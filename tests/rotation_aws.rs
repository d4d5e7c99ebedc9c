//! Root key rotation from a file key to an AWS KMS key (moto), through the real binary:
//! `kms-plugin rotate` under load, dropping the retired key, and recovery through the
//! also_wrap copy when the active root is lost.

#![cfg(feature = "aws-kms")]

#[path = "backends/aws.rs"]
mod aws_backend;
mod backends;
mod common;
mod contract;
#[path = "support/moto.rs"]
mod moto;
mod rotation;
mod softhsm;

use aws_backend::AwsBackend;
use backends::file::FileBackend;

rotation_tests!(FileBackend, AwsBackend::start());
