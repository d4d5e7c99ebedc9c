//! Running the plugin, through the real binary: start-up, shutdown and socket hygiene, what
//! an operator trips over, file and process hardening, connection floods, metrics and
//! systemd notifications.

mod support;

mod operations {
    mod callers;
    mod hardening;
    mod lifecycle;
    mod metrics;
    mod operator;
    mod systemd;
}
