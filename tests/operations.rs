//! Running the plugin, through the real binary: start-up, shutdown and socket hygiene, what
//! an operator trips over, file and process hardening, connection floods, metrics and
//! systemd notifications and socket activation, and the deploy/ manifests against the config.
#![allow(unsafe_code)] // tests drive processes and limits through libc (kill, pipe, rlimit, getuid)
#![allow(missing_docs)] // test harness items are shared between modules, not a documented API

mod support;

mod operations {
    mod callers;
    mod deploy;
    mod hardening;
    mod lifecycle;
    mod memory;
    mod metrics;
    mod operator;
    mod systemd;
    mod upgrade;
}
